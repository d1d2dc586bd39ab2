// KV page allocator with reference counts.
//
// The KV pool is `num_pages` pages of `page_size` token slots each. A page is either free
// (ref_count == 0, on the free stack) or live (ref_count >= 1). Several owners may hold one
// page (the radix tree and the sequences forked from a shared prefix); the page goes back
// to the free stack when its last owner releases it.
//
// Invariants (checked by tests/cache/test_page_allocator.py after every operation):
//   * each page id in [0, num_pages) is on the free stack exactly when its ref_count is 0;
//   * num_free() + number of live pages == num_pages;
//   * a failed call changes nothing (validation happens before any mutation).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace engine {

// Raised when an allocation asks for more pages than are free. The scheduler catches it
// (or checks num_free() first) and evicts or preempts; it is not a bug.
class OutOfPages : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class PageAllocator {
 public:
  PageAllocator(int64_t num_pages, int64_t page_size);

  // Takes `n` free pages, each with ref_count 1. Lowest ids first on a fresh pool.
  std::vector<int32_t> allocate(int64_t n);
  // Adds one owner to each listed page (repeats count once each). Pages must be live.
  void retain(const std::vector<int32_t>& pages);
  // Drops one owner from each listed page; pages reaching 0 return to the free stack.
  // Returns how many pages were freed.
  int64_t release(const std::vector<int32_t>& pages);

  int32_t ref_count(int32_t page) const;
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_pages() const { return num_pages_; }
  int64_t page_size() const { return page_size_; }
  // Pages needed to hold `num_tokens` tokens.
  int64_t pages_for_tokens(int64_t num_tokens) const;
  // Token slot (page * page_size + offset) of positions [start, end) of a sequence whose
  // page table is `page_table`. This is the per-token address the KV store kernel writes.
  std::vector<int64_t> slot_mapping(const std::vector<int32_t>& page_table, int64_t start,
                                    int64_t end) const;

 private:
  void check_page(int32_t page) const;

  int64_t num_pages_;
  int64_t page_size_;
  std::vector<int32_t> ref_counts_;
  std::vector<int32_t> free_;  // stack; back() is handed out next
};

}  // namespace engine
