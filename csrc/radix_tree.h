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
// Invariants (checked by check_invariants(), exercised by the hypothesis tests):
//   * key.size() == slots.size() >= 1 for every node but the root;
//   * a node's children start with distinct tokens, and children[t]->key[0] == t;
//   * lock_ref(node) >= sum of lock_ref(children) (a lock counts on the node and on every
//     ancestor up to the root), so an unlocked node has no locked descendant;
//   * locked nodes are never evicted; eviction takes least-recently-used unlocked leaves;
//   * KV inserted under an older weights version is refused (insert returns node -1).
#pragma once

#include <cstdint>
#include <memory>
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
  MatchResult match_prefix(const std::vector<int32_t>& tokens, int64_t max_len = -1);
  // Adopts the KV of `tokens` (slots[i] holds token i). The part the tree already has keeps
  // the tree's slots; the caller keeps ownership of its own duplicate pages.
  InsertResult insert(const std::vector<int32_t>& tokens, const std::vector<int64_t>& slots,
                      int64_t version);
  void lock(int64_t node);
  void unlock(int64_t node);
  // Evicts LRU unlocked leaves until the allocator has `target_free_pages` free pages or
  // nothing unlocked is left. Returns the number of tokens evicted.
  int64_t evict(int64_t target_free_pages);
  // Drops every node and bumps the weights version. Throws if any node is locked.
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
  // Token prefix spelled by `node` (tests and debugging).
  std::vector<int32_t> tokens_of(int64_t node) const;
  void check_invariants() const;

 private:
  struct Node {
    int64_t id = 0;
    int64_t parent = -1;
    std::vector<int32_t> key;
    std::vector<int64_t> slots;
    std::unordered_map<int32_t, int64_t> children;  // first token -> child id
    int64_t lock_ref = 0;
    uint64_t last_access = 0;
  };

  Node& node(int64_t id);
  const Node& node(int64_t id) const;
  int64_t new_node(int64_t parent, std::vector<int32_t> key, std::vector<int64_t> slots);
  int64_t split(int64_t child, size_t at);  // returns the new upper node
  void remove_leaf(int64_t id);
  std::vector<int32_t> pages_of(const std::vector<int64_t>& slots) const;

  std::shared_ptr<PageAllocator> allocator_;
  std::unordered_map<int64_t, std::unique_ptr<Node>> nodes_;  // pointers stay valid on rehash
  int64_t next_id_ = 1;
  uint64_t clock_ = 0;
  int64_t version_ = 0;
};

}  // namespace engine
