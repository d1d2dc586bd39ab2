// pybind11 module `engine._C`: host-side data structures of the engine.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "page_allocator.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Host-side C++ for the engine: KV page allocator (radix tree joins later).";

  py::register_exception<engine::OutOfPages>(m, "OutOfPages", PyExc_RuntimeError);

  py::class_<engine::PageAllocator>(m, "PageAllocator")
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
}
