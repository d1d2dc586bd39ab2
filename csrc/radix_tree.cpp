#include "radix_tree.h"

#include <algorithm>
#include <queue>
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

int64_t RadixTree::new_node(int64_t parent, std::vector<int32_t> key, std::vector<int64_t> slots) {
  auto n = std::make_unique<Node>();
  n->id = next_id_++;
  n->parent = parent;
  n->key = std::move(key);
  n->slots = std::move(slots);
  n->last_access = ++clock_;
  const int64_t id = n->id;
  node(parent).children[n->key[0]] = id;
  nodes_.emplace(id, std::move(n));
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
  const uint64_t last_access = child.last_access;
  const int32_t child_first = child.key[0];
  const int64_t upper = new_node(parent_id, std::move(upper_key), std::move(upper_slots));
  Node& up = node(upper);
  up.lock_ref = lock_ref;  // every lock below the upper node passes through it
  up.last_access = last_access;
  up.children[child_first] = child_id;
  node(child_id).parent = upper;
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
    Node& m = node(next);
    m.last_access = now;
    out.slots.insert(out.slots.end(), m.slots.begin(), m.slots.end());
    pos += k;
    cur = next;  // after a split the next lookup misses (or pos == limit) and the loop ends
  }
  out.node = cur;
  out.length = static_cast<int64_t>(pos);
  return out;
}

InsertResult RadixTree::insert(const std::vector<int32_t>& tokens, const std::vector<int64_t>& slots,
                               int64_t version) {
  if (tokens.size() != slots.size()) {
    throw std::invalid_argument("insert: " + std::to_string(tokens.size()) + " tokens but " +
                                std::to_string(slots.size()) + " slots");
  }
  if (version != version_) return {-1, 0};  // KV from older weights: never cached
  int64_t cur = 0;
  size_t pos = 0;
  const uint64_t now = ++clock_;
  while (pos < tokens.size()) {
    Node& n = node(cur);
    auto it = n.children.find(tokens[pos]);
    if (it == n.children.end()) {
      std::vector<int32_t> key(tokens.begin() + pos, tokens.end());
      std::vector<int64_t> vals(slots.begin() + pos, slots.end());
      allocator_->retain(pages_of(vals));
      const int64_t adopted = static_cast<int64_t>(key.size());
      cur = new_node(cur, std::move(key), std::move(vals));
      return {cur, adopted};
    }
    Node& child = node(it->second);
    size_t k = 0;
    while (k < child.key.size() && pos + k < tokens.size() && child.key[k] == tokens[pos + k]) ++k;
    cur = k < child.key.size() ? split(child.id, k) : child.id;
    node(cur).last_access = now;
    pos += k;
  }
  return {cur, 0};
}

void RadixTree::lock(int64_t id) {
  node(id);  // validates the id
  for (int64_t cur = id; cur != -1; cur = node(cur).parent) ++node(cur).lock_ref;
}

void RadixTree::unlock(int64_t id) {
  for (int64_t cur = id; cur != -1; cur = node(cur).parent) {
    if (node(cur).lock_ref <= 0) throw std::invalid_argument("unlock of unlocked radix node " + std::to_string(id));
  }
  for (int64_t cur = id; cur != -1; cur = node(cur).parent) --node(cur).lock_ref;
}

void RadixTree::remove_leaf(int64_t id) {
  Node& n = node(id);
  allocator_->release(pages_of(n.slots));
  node(n.parent).children.erase(n.key[0]);
  nodes_.erase(id);
}

int64_t RadixTree::evict(int64_t target_free_pages) {
  using Entry = std::pair<uint64_t, int64_t>;  // (last_access, id): oldest first
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> leaves;
  for (const auto& [id, n] : nodes_) {
    if (id != 0 && n->children.empty() && n->lock_ref == 0) leaves.emplace(n->last_access, id);
  }
  int64_t evicted = 0;
  while (allocator_->num_free() < target_free_pages && !leaves.empty()) {
    const int64_t id = leaves.top().second;
    leaves.pop();
    const int64_t parent = node(id).parent;
    evicted += static_cast<int64_t>(node(id).key.size());
    remove_leaf(id);
    const Node& p = node(parent);
    if (parent != 0 && p.children.empty() && p.lock_ref == 0) leaves.emplace(p.last_access, parent);
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
    int64_t child_locks = 0;
    for (const auto& [tok, cid] : n->children) {
      const Node& c = node(cid);
      if (c.parent != id) fail("child's parent pointer");
      if (c.key.empty() || c.key[0] != tok) fail("child keyed by a token it does not start with");
      child_locks += c.lock_ref;
    }
    if (n->lock_ref < child_locks) fail("lock count below the sum of its children's");
    if (id != 0 && !node(n->parent).children.count(n->key[0])) fail("not linked from its parent");
  }
}

}  // namespace engine
