// pybind11 module `engine._C`: host-side data structures of the engine.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "page_allocator.h"
#include "radix_tree.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Host-side C++ for the engine: KV page allocator and radix prefix tree.";

  py::register_exception<engine::OutOfPages>(m, "OutOfPages", PyExc_RuntimeError);

  py::class_<engine::PageAllocator, std::shared_ptr<engine::PageAllocator>>(m, "PageAllocator")
      .def(py::init<int64_t, int64_t>(), py::arg("num_pages"), py::arg("page_size"))
      .def("allocate", &engine::PageAllocator::allocate, py::arg("n"),
           "Take n free pages (ref count 1 each); raises OutOfPages if fewer are free.")
      .def("retain", &engine::PageAllocator::retain, py::arg("pages"),
           "Add one owner to each live page.")
      .def("release", &engine::PageAllocator::release, py::arg("pages"),
           "Drop one owner from each page; returns how many pages became free.")
      .def("ref_count", &engine::PageAllocator::ref_count, py::arg("page"))
      .def("pages_for_tokens", &engine::PageAllocator::pages_for_tokens, py::arg("num_tokens"))
      .def("slot_mapping", &engine::PageAllocator::slot_mapping, py::arg("page_table"),
           py::arg("start"), py::arg("end"),
           "Token slots (page * page_size + offset) of positions [start, end).")
      .def_property_readonly("num_free", &engine::PageAllocator::num_free)
      .def_property_readonly("num_pages", &engine::PageAllocator::num_pages)
      .def_property_readonly("page_size", &engine::PageAllocator::page_size)
      .def("__repr__", [](const engine::PageAllocator& a) {
        return "PageAllocator(num_pages=" + std::to_string(a.num_pages()) +
               ", page_size=" + std::to_string(a.page_size()) +
               ", num_free=" + std::to_string(a.num_free()) + ")";
      });

  py::class_<engine::RadixTree>(m, "RadixTree")
      .def(py::init<std::shared_ptr<engine::PageAllocator>>(), py::arg("allocator"))
      .def("match_prefix",
           [](engine::RadixTree& t, const std::vector<int32_t>& tokens, int64_t max_len) {
             auto r = t.match_prefix(tokens, max_len);
             return py::make_tuple(r.node, r.length, r.slots);
           },
           py::arg("tokens"), py::arg("max_len") = -1,
           "(node, matched_length, slots) of the longest cached prefix of tokens[:max_len].")
      .def("insert",
           [](engine::RadixTree& t, const std::vector<int32_t>& tokens, const std::vector<int64_t>& slots,
              int64_t version, bool cold) {
             auto r = t.insert(tokens, slots, version, cold);
             return py::make_tuple(r.node, r.adopted);
           },
           py::arg("tokens"), py::arg("slots"), py::arg("version"), py::arg("cold") = false,
           "Adopt KV for tokens (slots[i] holds token i); returns (node, adopted_tokens); node -1\n"
           "if version is stale. Nodes this call creates are evicted before every warm unheld\n"
           "leaf if cold=True; nodes already on the path become most recently used either way.")
      .def("insert_paged",
           [](engine::RadixTree& t, const std::vector<int32_t>& tokens, const std::vector<int32_t>& page_table,
              int64_t num_tokens, int64_t version, bool cold) {
             auto r = t.insert_paged(tokens, page_table, num_tokens, version, cold);
             return py::make_tuple(r.node, r.adopted);
           },
           py::arg("tokens"), py::arg("page_table"), py::arg("num_tokens"), py::arg("version"),
           py::arg("cold") = false,
           "insert(tokens[:num_tokens], slots, version, cold) with slot of position p =\n"
           "page_table[p // page_size] * page_size + p % page_size. Returns (node, adopted_tokens);\n"
           "raises ValueError if num_tokens exceeds len(tokens) or the page table's capacity.")
      .def("lock", &engine::RadixTree::lock, py::arg("node"),
           "Pin node and its ancestors: never evicted until unlock(node).")
      .def("unlock", &engine::RadixTree::unlock, py::arg("node"))
      .def("hold", &engine::RadixTree::hold, py::arg("node"),
           "Soft-pin node and its ancestors: held leaves are evicted only after every unheld one.")
      .def("release_hold", &engine::RadixTree::release_hold, py::arg("node"),
           "Drop one hold taken by hold(node). Returns True if the node is live, False if it was\n"
           "evicted while held; raises ValueError if node has no hold of its own to release.")
      .def("evict", &engine::RadixTree::evict, py::arg("target_free_pages"),
           "Evict leaves until that many pages are free: unheld leaves first (cold ones, then least\n"
           "recently used), held leaves last, locked never. Returns evicted tokens.")
      .def("reset", &engine::RadixTree::reset,
           "Drop every node and hold and bump the weights version; raises if any node is locked.")
      .def_property_readonly("version", &engine::RadixTree::version)
      .def_property_readonly("num_nodes", &engine::RadixTree::num_nodes)
      .def_property_readonly("cached_tokens", &engine::RadixTree::cached_tokens)
      .def_property_readonly("evictable_tokens", &engine::RadixTree::evictable_tokens)
      .def_property_readonly("evictable_pages", &engine::RadixTree::evictable_pages)
      .def("page_refs", &engine::RadixTree::page_refs)
      .def("lock_ref", &engine::RadixTree::lock_ref, py::arg("node"))
      .def("hold_ref", &engine::RadixTree::hold_ref, py::arg("node"),
           "Holds on node and on all its descendants.")
      .def("tokens_of", &engine::RadixTree::tokens_of, py::arg("node"))
      .def("check_invariants", &engine::RadixTree::check_invariants);
}
