#include "radix_tree.h"

#include <algorithm>
#include <set>
#include <stdexcept>
#include <string>

namespace engine {

RadixTree::RadixTree(std::shared_ptr<PageAllocator> allocator) : allocator_(std::move(allocator)) {
  if (!allocator_) throw std::invalid_argument("RadixTree needs a PageAllocator");
  auto root = std::make_unique<Node>();
  root->id = 0;
  nodes_.emplace(0, std::move(root));
}

RadixTree::Node& RadixTree::node(int64_t id) {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) throw std::invalid_argument("no radix node " + std::to_string(id));
  return *it->second;
}

const RadixTree::Node& RadixTree::node(int64_t id) const {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) throw std::invalid_argument("no radix node " + std::to_string(id));
  return *it->second;
}

std::vector<int32_t> RadixTree::pages_of(const std::vector<int64_t>& slots) const {
  std::set<int32_t> pages;
  for (int64_t s : slots) pages.insert(static_cast<int32_t>(s / allocator_->page_size()));
  return {pages.begin(), pages.end()};
}

bool RadixTree::is_evictable(const Node& n) {
  return n.id != 0 && n.children.empty() && n.lock_ref == 0;
}

RadixTree::EvictKey RadixTree::evict_key_of(const Node& n) {
  return {n.hold_ref > 0 ? 1 : 0, n.last_access, n.id};
}

void RadixTree::refresh(int64_t id) {
  Node& n = node(id);
  if (n.evictable) {
    evictable_.erase(n.evict_key);
    n.evictable = false;
  }
  if (is_evictable(n)) {
    n.evict_key = evict_key_of(n);
    evictable_.insert(n.evict_key);
    n.evictable = true;
  }
}

void RadixTree::touch(int64_t id, uint64_t now) {
  node(id).last_access = now;
  refresh(id);
}

void RadixTree::add_along_path(int64_t id, int64_t Node::*field, int64_t delta) {
  for (int64_t cur = id; cur != -1; cur = node(cur).parent) {
    node(cur).*field += delta;
    refresh(cur);  // only a leaf's key changes, but re-filing every node keeps the rule simple
  }
}

int64_t RadixTree::new_node(int64_t parent, std::vector<int32_t> key, std::vector<int64_t> slots,
                            uint64_t last_access) {
  auto n = std::make_unique<Node>();
  n->id = next_id_++;
  n->parent = parent;
  n->key = std::move(key);
  n->slots = std::move(slots);
  n->last_access = last_access;
  const int64_t id = n->id;
  node(parent).children[n->key[0]] = id;
  nodes_.emplace(id, std::move(n));
  refresh(id);      // a new node is a leaf
  refresh(parent);  // which its parent no longer is
  return id;
}

int64_t RadixTree::split(int64_t child_id, size_t at) {
  Node& child = node(child_id);
  const int64_t parent_id = child.parent;
  std::vector<int32_t> upper_key(child.key.begin(), child.key.begin() + at);
  std::vector<int64_t> upper_slots(child.slots.begin(), child.slots.begin() + at);
  child.key.erase(child.key.begin(), child.key.begin() + at);
  child.slots.erase(child.slots.begin(), child.slots.begin() + at);
  // Both halves now hold a reference to the pages they share (at most the straddled page).
  std::vector<int32_t> a = pages_of(upper_slots), b = pages_of(child.slots), shared;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(shared));
  allocator_->retain(shared);

  const int64_t lock_ref = child.lock_ref;
  const int64_t hold_ref = child.hold_ref;
  const uint64_t last_access = child.last_access;
  const int32_t child_first = child.key[0];
  // new_node() replaces the child in the parent's children (same first token).
  const int64_t upper = new_node(parent_id, std::move(upper_key), std::move(upper_slots), last_access);
  Node& up = node(upper);
  up.lock_ref = lock_ref;  // every lock below the upper node passes through it,
  up.hold_ref = hold_ref;  // and so does every hold (the lower node keeps its own holds)
  up.children[child_first] = child_id;
  node(child_id).parent = upper;
  refresh(upper);     // has a child: not evictable
  refresh(child_id);  // its children, refs and last_access are unchanged: the same key
  return upper;
}

MatchResult RadixTree::match_prefix(const std::vector<int32_t>& tokens, int64_t max_len) {
  const size_t limit = max_len < 0 ? tokens.size() : std::min<size_t>(tokens.size(), max_len);
  MatchResult out{0, 0, {}};
  int64_t cur = 0;
  size_t pos = 0;
  const uint64_t now = ++clock_;
  while (pos < limit) {
    Node& n = node(cur);
    auto it = n.children.find(tokens[pos]);
    if (it == n.children.end()) break;
    Node& child = node(it->second);
    size_t k = 0;
    while (k < child.key.size() && pos + k < limit && child.key[k] == tokens[pos + k]) ++k;
    int64_t next = child.id;
    if (k < child.key.size()) next = split(child.id, k);
    touch(next, now);
    const Node& m = node(next);
    out.slots.insert(out.slots.end(), m.slots.begin(), m.slots.end());
    pos += k;
    cur = next;  // after a split the next lookup misses (or pos == limit) and the loop ends
  }
  out.node = cur;
  out.length = static_cast<int64_t>(pos);
  return out;
}

InsertResult RadixTree::insert(const std::vector<int32_t>& tokens, const std::vector<int64_t>& slots,
                               int64_t version, bool cold) {
  if (tokens.size() != slots.size()) {
    throw std::invalid_argument("insert: " + std::to_string(tokens.size()) + " tokens but " +
                                std::to_string(slots.size()) + " slots");
  }
  return insert_prefix(tokens, tokens.size(), slots, version, cold);
}

InsertResult RadixTree::insert_paged(const std::vector<int32_t>& tokens,
                                     const std::vector<int32_t>& page_table, int64_t num_tokens,
                                     int64_t version, bool cold) {
  if (num_tokens < 0 || num_tokens > static_cast<int64_t>(tokens.size())) {
    throw std::invalid_argument("insert_paged: num_tokens " + std::to_string(num_tokens) +
                                " is outside [0, " + std::to_string(tokens.size()) +
                                "] (the number of tokens given)");
  }
  const int64_t capacity = static_cast<int64_t>(page_table.size()) * allocator_->page_size();
  if (num_tokens > capacity) {
    throw std::invalid_argument("insert_paged: num_tokens " + std::to_string(num_tokens) +
                                " exceeds the page table's " + std::to_string(capacity) + " slots (" +
                                std::to_string(page_table.size()) + " pages of " +
                                std::to_string(allocator_->page_size()) + ")");
  }
  const std::vector<int64_t> slots = allocator_->slot_mapping(page_table, 0, num_tokens);
  return insert_prefix(tokens, static_cast<size_t>(num_tokens), slots, version, cold);
}

InsertResult RadixTree::insert_prefix(const std::vector<int32_t>& tokens, size_t n,
                                      const std::vector<int64_t>& slots, int64_t version, bool cold) {
  if (version != version_) return {-1, 0};  // KV from older weights: never cached
  int64_t cur = 0;
  size_t pos = 0;
  const uint64_t now = ++clock_;
  while (pos < n) {
    Node& parent = node(cur);
    auto it = parent.children.find(tokens[pos]);
    if (it == parent.children.end()) {
      std::vector<int32_t> key(tokens.begin() + pos, tokens.begin() + n);
      std::vector<int64_t> vals(slots.begin() + pos, slots.begin() + n);
      allocator_->retain(pages_of(vals));
      const int64_t adopted = static_cast<int64_t>(key.size());
      // A cold node sorts before every warm one (warm stamps are ++clock_ >= 1), oldest id first.
      cur = new_node(cur, std::move(key), std::move(vals), cold ? 0 : now);
      return {cur, adopted};
    }
    Node& child = node(it->second);
    size_t k = 0;
    while (k < child.key.size() && pos + k < n && child.key[k] == tokens[pos + k]) ++k;
    cur = k < child.key.size() ? split(child.id, k) : child.id;
    touch(cur, now);
    pos += k;
  }
  return {cur, 0};
}

void RadixTree::lock(int64_t id) {
  node(id);  // validates the id
  add_along_path(id, &Node::lock_ref, 1);
}

void RadixTree::unlock(int64_t id) {
  for (int64_t cur = id; cur != -1; cur = node(cur).parent) {
    if (node(cur).lock_ref <= 0) throw std::invalid_argument("unlock of unlocked radix node " + std::to_string(id));
  }
  add_along_path(id, &Node::lock_ref, -1);
}

void RadixTree::hold(int64_t id) {
  ++node(id).own_holds;  // validates the id
  add_along_path(id, &Node::hold_ref, 1);
}

bool RadixTree::release_hold(int64_t id) {
  auto live = nodes_.find(id);
  if (live == nodes_.end()) {
    auto gone = evicted_holds_.find(id);
    if (gone == evicted_holds_.end()) {
      throw std::invalid_argument("release_hold of radix node " + std::to_string(id) +
                                  ": no such node, and none evicted while held");
    }
    if (--gone->second == 0) evicted_holds_.erase(gone);
    return false;  // the hold went with the node when it was evicted
  }
  Node& n = *live->second;
  if (n.own_holds <= 0) {
    throw std::invalid_argument("release_hold of radix node " + std::to_string(id) +
                                ", which has no hold of its own (hold_ref " +
                                std::to_string(n.hold_ref) + ")");
  }
  --n.own_holds;
  add_along_path(id, &Node::hold_ref, -1);
  return true;
}

void RadixTree::remove_leaf(int64_t id) {
  Node& n = node(id);
  if (n.evictable) evictable_.erase(n.evict_key);
  allocator_->release(pages_of(n.slots));
  const int64_t parent = n.parent;
  node(parent).children.erase(n.key[0]);
  nodes_.erase(id);
  refresh(parent);  // it may have become a leaf
}

void RadixTree::evict_leaf(int64_t id) {
  const Node& n = node(id);
  if (n.hold_ref > 0) {
    // A leaf's hold_ref is exactly its own holds: they leave the tree with it, and each
    // later release_hold(id) settles one of them.
    const int64_t holds = n.hold_ref;
    evicted_holds_[id] += holds;
    add_along_path(n.parent, &Node::hold_ref, -holds);
  }
  remove_leaf(id);
}

int64_t RadixTree::evict(int64_t target_free_pages) {
  int64_t evicted = 0;
  while (allocator_->num_free() < target_free_pages && !evictable_.empty()) {
    const int64_t id = std::get<2>(*evictable_.begin());  // smallest (tier, last_access, id)
    evicted += static_cast<int64_t>(node(id).key.size());
    evict_leaf(id);
  }
  return evicted;
}

void RadixTree::reset() {
  if (node(0).lock_ref > 0) {
    throw std::runtime_error("cannot reset the radix tree while " + std::to_string(node(0).lock_ref) +
                             " lock(s) are held by running sequences");
  }
  for (auto& [id, n] : nodes_) {
    if (id != 0) allocator_->release(pages_of(n->slots));
  }
  nodes_.clear();
  evictable_.clear();
  evicted_holds_.clear();
  auto root = std::make_unique<Node>();
  nodes_.emplace(0, std::move(root));
  ++version_;
}

int64_t RadixTree::cached_tokens() const {
  int64_t total = 0;
  for (const auto& [id, n] : nodes_) total += static_cast<int64_t>(n->key.size());
  return total;
}

int64_t RadixTree::evictable_tokens() const {
  int64_t total = 0;
  for (const auto& [id, n] : nodes_) {
    if (n->lock_ref == 0) total += static_cast<int64_t>(n->key.size());
  }
  return total;
}

int64_t RadixTree::evictable_pages() const {
  std::unordered_map<int32_t, int32_t> unlocked_refs;
  for (const auto& [id, n] : nodes_) {
    if (id == 0 || n->lock_ref > 0) continue;
    for (int32_t p : pages_of(n->slots)) ++unlocked_refs[p];
  }
  int64_t pages = 0;
  for (const auto& [p, refs] : unlocked_refs) {
    if (allocator_->ref_count(p) == refs) ++pages;
  }
  return pages;
}

std::unordered_map<int32_t, int32_t> RadixTree::page_refs() const {
  std::unordered_map<int32_t, int32_t> refs;
  for (const auto& [id, n] : nodes_) {
    if (id == 0) continue;
    for (int32_t p : pages_of(n->slots)) ++refs[p];
  }
  return refs;
}

int64_t RadixTree::lock_ref(int64_t id) const { return node(id).lock_ref; }

int64_t RadixTree::hold_ref(int64_t id) const { return node(id).hold_ref; }

std::vector<int32_t> RadixTree::tokens_of(int64_t id) const {
  std::vector<const Node*> path;
  for (int64_t cur = id; cur != -1; cur = node(cur).parent) path.push_back(&node(cur));
  std::vector<int32_t> out;
  for (auto it = path.rbegin(); it != path.rend(); ++it) out.insert(out.end(), (*it)->key.begin(), (*it)->key.end());
  return out;
}

void RadixTree::check_invariants() const {
  for (const auto& [id, n] : nodes_) {
    auto fail = [&](const std::string& what) {
      throw std::logic_error("radix invariant broken at node " + std::to_string(id) + ": " + what);
    };
    if (id != 0 && (n->key.empty() || n->key.size() != n->slots.size())) fail("key/slots size");
    if (n->lock_ref < 0) fail("negative lock count");
    if (n->hold_ref < 0) fail("negative hold count");
    if (n->own_holds < 0) fail("negative own hold count");
    int64_t child_locks = 0, child_holds = 0;
    for (const auto& [tok, cid] : n->children) {
      const Node& c = node(cid);
      if (c.parent != id) fail("child's parent pointer");
      if (c.key.empty() || c.key[0] != tok) fail("child keyed by a token it does not start with");
      child_locks += c.lock_ref;
      child_holds += c.hold_ref;
    }
    if (n->lock_ref < child_locks) fail("lock count below the sum of its children's");
    if (n->hold_ref < child_holds) fail("hold count below the sum of its children's");
    if (n->hold_ref != n->own_holds + child_holds) fail("hold count is not own holds + children's");
    if (id != 0 && !node(n->parent).children.count(n->key[0])) fail("not linked from its parent");
    if (id >= next_id_) fail("id not yet handed out");
  }
  check_evictable_set();
  for (const auto& [id, holds] : evicted_holds_) {
    if (nodes_.count(id) || id <= 0 || id >= next_id_ || holds < 1) {
      throw std::logic_error("radix invariant broken: evicted-holds entry " + std::to_string(id) +
                             " -> " + std::to_string(holds));
    }
  }
}

void RadixTree::check_evictable_set() const {
  size_t eligible = 0;
  for (const auto& [id, n] : nodes_) {
    auto fail = [&](const std::string& what) {
      throw std::logic_error("radix evictable set broken at node " + std::to_string(id) + ": " + what);
    };
    if (!is_evictable(*n)) {
      if (n->evictable) fail("filed as evictable but is the root, has children or is locked");
      continue;
    }
    ++eligible;
    if (!n->evictable) fail("an unlocked leaf missing from the evictable set");
    if (n->evict_key != evict_key_of(*n)) fail("filed under a stale (tier, last_access) key");
    if (!evictable_.count(n->evict_key)) fail("its key is not in the evictable set");
  }
  // Keys are distinct (they end in the id), so equal sizes mean no extra entries.
  if (evictable_.size() != eligible) {
    throw std::logic_error("radix evictable set has " + std::to_string(evictable_.size()) +
                           " entries for " + std::to_string(eligible) + " evictable leaves");
  }
}

}  // namespace engine
