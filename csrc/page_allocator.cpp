#include "page_allocator.h"

#include <unordered_map>

namespace engine {

PageAllocator::PageAllocator(int64_t num_pages, int64_t page_size)
    : num_pages_(num_pages), page_size_(page_size) {
  if (num_pages <= 0 || num_pages > INT32_MAX) {
    throw std::invalid_argument("num_pages must be in [1, 2^31 - 1], got " +
                                std::to_string(num_pages));
  }
  if (page_size <= 0) {
    throw std::invalid_argument("page_size must be >= 1, got " + std::to_string(page_size));
  }
  ref_counts_.assign(num_pages, 0);
  free_.reserve(num_pages);
  for (int64_t p = num_pages - 1; p >= 0; --p) free_.push_back(static_cast<int32_t>(p));
}

std::vector<int32_t> PageAllocator::allocate(int64_t n) {
  if (n < 0) throw std::invalid_argument("cannot allocate a negative number of pages: " +
                                         std::to_string(n));
  if (n > num_free()) {
    throw OutOfPages("KV pool out of pages: requested " + std::to_string(n) + ", free " +
                     std::to_string(num_free()) + " of " + std::to_string(num_pages_));
  }
  std::vector<int32_t> pages(free_.end() - n, free_.end());
  free_.resize(free_.size() - n);
  std::vector<int32_t> out(pages.rbegin(), pages.rend());  // lowest id first
  for (int32_t p : out) ref_counts_[p] = 1;
  return out;
}

void PageAllocator::check_page(int32_t page) const {
  if (page < 0 || page >= num_pages_) {
    throw std::invalid_argument("page id " + std::to_string(page) + " out of range [0, " +
                                std::to_string(num_pages_) + ")");
  }
}

void PageAllocator::retain(const std::vector<int32_t>& pages) {
  for (int32_t p : pages) {
    check_page(p);
    if (ref_counts_[p] == 0) {
      throw std::invalid_argument("retain of free page " + std::to_string(p));
    }
  }
  for (int32_t p : pages) ++ref_counts_[p];
}

int64_t PageAllocator::release(const std::vector<int32_t>& pages) {
  // Validate the whole call first so a bad id (or a page released more often than it is
  // held) leaves the pool untouched.
  std::unordered_map<int32_t, int32_t> drops;
  for (int32_t p : pages) {
    check_page(p);
    if (++drops[p] > ref_counts_[p]) {
      throw std::invalid_argument("release of page " + std::to_string(p) + " exceeds its " +
                                  std::to_string(ref_counts_[p]) + " owner(s)");
    }
  }
  int64_t freed = 0;
  for (int32_t p : pages) {
    if (--ref_counts_[p] == 0) {
      free_.push_back(p);
      ++freed;
    }
  }
  return freed;
}

int32_t PageAllocator::ref_count(int32_t page) const {
  check_page(page);
  return ref_counts_[page];
}

int64_t PageAllocator::pages_for_tokens(int64_t num_tokens) const {
  if (num_tokens < 0) throw std::invalid_argument("negative token count " +
                                                  std::to_string(num_tokens));
  return (num_tokens + page_size_ - 1) / page_size_;
}

std::vector<int64_t> PageAllocator::slot_mapping(const std::vector<int32_t>& page_table,
                                                 int64_t start, int64_t end) const {
  const int64_t capacity = static_cast<int64_t>(page_table.size()) * page_size_;
  if (start < 0 || end < start || end > capacity) {
    throw std::invalid_argument("positions [" + std::to_string(start) + ", " +
                                std::to_string(end) + ") do not fit a page table of " +
                                std::to_string(page_table.size()) + " pages (" +
                                std::to_string(capacity) + " slots)");
  }
  std::vector<int64_t> slots;
  slots.reserve(end - start);
  for (int64_t pos = start; pos < end; ++pos) {
    const int32_t page = page_table[pos / page_size_];
    check_page(page);
    slots.push_back(static_cast<int64_t>(page) * page_size_ + pos % page_size_);
  }
  return slots;
}

}  // namespace engine
