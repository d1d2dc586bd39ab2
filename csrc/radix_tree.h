// Radix prefix tree over token sequences whose values are KV slots.
//
// Each node holds a run of tokens (`key`) and, position for position, the pool slot that
// holds each token's KV (`slots`, slot = page * page_size + offset). The concatenated keys
// from the root to a node spell a token prefix whose KV is in the pool.
//
// Ownership: a node holds one reference (in the PageAllocator) to every distinct page its
// slots touch. Sequences hold their own references to the pages of their page tables, so
// a page is free exactly when no node and no sequence refers to it.
//
// Locks and holds. A lock (lock/unlock) pins a prefix that a running admission reads: a
// locked node is never evicted. A hold (hold/release_hold) is a soft pin: the engine holds
// the deepest matched node of every queued request so that the prefixes those requests
// will match are evicted last. Both count on the node and on every ancestor up to the root.
//
// Eviction order. Evictable nodes are the non-root leaves with lock_ref == 0, kept in an
// ordered set keyed by (tier, last_access, id), maintained incrementally, so evict() costs
// O(evicted * log n) and never scans the tree:
//   1. unheld leaves (tier 0): cold ones first (inserted with cold=true and not matched
//      since: last_access 0, oldest id first), then least recently used;
//   2. held leaves (tier 1), least recently used first, only as a last resort;
//   never locked nodes. Evicting a leaf can make its parent an evictable leaf.
// When a held leaf is evicted its holds are subtracted from its ancestors and remembered
// by id; each later release_hold(id) then returns false instead of throwing.
//
// Invariants (checked by check_invariants(), exercised by the hypothesis tests):
//   * key.size() == slots.size() >= 1 for every node but the root;
//   * a node's children start with distinct tokens, and children[t]->key[0] == t;
//   * lock_ref(node) >= sum of lock_ref(children) (a lock counts on the node and on every
//     ancestor up to the root), so an unlocked node has no locked descendant;
//   * hold_ref(node) == own holds(node) + sum of hold_ref(children) >= 0, so hold_ref(node)
//     >= sum of its children's, and a leaf's hold_ref is its own holds;
//   * the evictable set holds exactly the non-root childless nodes with lock_ref == 0, each
//     under its current key (hold_ref > 0 ? 1 : 0, last_access, id);
//   * the evicted-holds map only names ids that are no longer live, each with a count >= 1;
//   * locked nodes are never evicted; eviction follows the order above;
//   * KV inserted under an older weights version is refused (insert returns node -1).
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "page_allocator.h"

namespace engine {

struct MatchResult {
  int64_t node;                // deepest node of the match (root = 0 when nothing matched)
  int64_t length;              // matched tokens
  std::vector<int64_t> slots;  // KV slot of each matched token
};

struct InsertResult {
  int64_t node;     // node spelling the whole inserted sequence; -1 if refused (stale version)
  int64_t adopted;  // tokens whose slots the tree took (the rest it already had)
};

class RadixTree {
 public:
  explicit RadixTree(std::shared_ptr<PageAllocator> allocator);

  // Longest cached prefix of tokens[:max_len] (max_len < 0: all). When the match ends inside
  // a node, the node is split so the returned node spells exactly the matched prefix.
  // Every node on the matched path becomes the most recently used.
  MatchResult match_prefix(const std::vector<int32_t>& tokens, int64_t max_len = -1);
  // Adopts the KV of `tokens` (slots[i] holds token i). The part the tree already has keeps
  // the tree's slots; the caller keeps ownership of its own duplicate pages. Existing nodes
  // on the path become the most recently used; the nodes this call creates do too, unless
  // `cold`, in which case they get last_access 0 and go before every warm unheld leaf.
  InsertResult insert(const std::vector<int32_t>& tokens, const std::vector<int64_t>& slots,
                      int64_t version, bool cold = false);
  // insert(tokens[:num_tokens], slots, version, cold) with the slot of position p taken from
  // the page table: page_table[p / page_size] * page_size + p % page_size.
  InsertResult insert_paged(const std::vector<int32_t>& tokens, const std::vector<int32_t>& page_table,
                            int64_t num_tokens, int64_t version, bool cold = false);
  void lock(int64_t node);
  void unlock(int64_t node);
  // Adds a hold on `node` (and on every ancestor). Held leaves are evicted after all others.
  void hold(int64_t node);
  // Drops one hold that hold(node) took. Returns true if the node is live, false if it was
  // evicted while held (its holds were already dropped then). Throws std::invalid_argument
  // if `node` has no hold of its own to release.
  bool release_hold(int64_t node);
  // Evicts leaves in the order above until the allocator has `target_free_pages` free pages
  // or nothing unlocked is left. Returns the number of tokens evicted.
  int64_t evict(int64_t target_free_pages);
  // Drops every node, hold and remembered evicted hold, and bumps the weights version.
  // Throws if any node is locked.
  void reset();

  int64_t version() const { return version_; }
  int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size()) - 1; }
  int64_t cached_tokens() const;
  int64_t evictable_tokens() const;
  // Pages that evicting every unlocked node would return to the free list.
  int64_t evictable_pages() const;
  // page -> number of tree nodes holding a reference to it.
  std::unordered_map<int32_t, int32_t> page_refs() const;
  int64_t lock_ref(int64_t node) const;
  int64_t hold_ref(int64_t node) const;
  // Token prefix spelled by `node` (tests and debugging).
  std::vector<int32_t> tokens_of(int64_t node) const;
  void check_invariants() const;

 private:
  // (tier, last_access, id): tier 0 = unheld, 1 = held; the smallest key is evicted first.
  using EvictKey = std::tuple<int, uint64_t, int64_t>;

  struct Node {
    int64_t id = 0;
    int64_t parent = -1;
    std::vector<int32_t> key;
    std::vector<int64_t> slots;
    std::unordered_map<int32_t, int64_t> children;  // first token -> child id
    int64_t lock_ref = 0;
    int64_t hold_ref = 0;    // own holds + holds of all descendants
    int64_t own_holds = 0;   // holds taken by hold(this node) and not yet released
    uint64_t last_access = 0;
    bool evictable = false;  // in evictable_ under evict_key
    EvictKey evict_key{};
  };

  Node& node(int64_t id);
  const Node& node(int64_t id) const;
  static bool is_evictable(const Node& n);
  static EvictKey evict_key_of(const Node& n);
  // Re-files node `id` in evictable_: erases its old key, re-inserts it if it is eligible.
  // Call after anything that changes its children, lock_ref, hold_ref or last_access.
  void refresh(int64_t id);
  void touch(int64_t id, uint64_t now);
  // Adds `delta` to `field` of `id` and of every ancestor, refreshing each.
  void add_along_path(int64_t id, int64_t Node::*field, int64_t delta);
  int64_t new_node(int64_t parent, std::vector<int32_t> key, std::vector<int64_t> slots,
                   uint64_t last_access);
  int64_t split(int64_t child, size_t at);  // returns the new upper node
  // insert() of tokens[:n] with slots[i] for token i (slots.size() == n).
  InsertResult insert_prefix(const std::vector<int32_t>& tokens, size_t n,
                             const std::vector<int64_t>& slots, int64_t version, bool cold);
  void evict_leaf(int64_t id);
  void remove_leaf(int64_t id);
  std::vector<int32_t> pages_of(const std::vector<int64_t>& slots) const;
  void check_evictable_set() const;

  std::shared_ptr<PageAllocator> allocator_;
  std::unordered_map<int64_t, std::unique_ptr<Node>> nodes_;  // pointers stay valid on rehash
  std::set<EvictKey> evictable_;  // exactly the nodes with is_evictable(), by evict_key
  // id of a leaf evicted while held -> holds on it not yet released (entries are >= 1).
  std::unordered_map<int64_t, int64_t> evicted_holds_;
  int64_t next_id_ = 1;  // ids are never reused, not even across reset()
  uint64_t clock_ = 0;   // last_access 0 is reserved for cold nodes
  int64_t version_ = 0;
};

}  // namespace engine
