// pybind11 module `engine._C`: host-side data structures of the engine.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "page_allocator.h"
#include "radix_tree.h"
#include "sampler.h"

namespace py = pybind11;

namespace {

// A C-contiguous array of exactly dtype T and the given shape, never a converted copy (the
// caller's arrays are read in place), or a ValueError naming the argument.
template <typename T>
py::array_t<T> checked(const py::object& obj, const char* name, std::initializer_list<int64_t> shape) {
  if (!py::isinstance<py::array_t<T>>(obj)) {
    throw py::value_error(std::string(name) + " must be a numpy array of " + py::str(py::dtype::of<T>()).cast<std::string>());
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (a.ndim() != static_cast<py::ssize_t>(shape.size())) {
    throw py::value_error(std::string(name) + " must have " + std::to_string(shape.size()) + " dimension(s)");
  }
  int d = 0;
  for (int64_t n : shape) {
    if (a.shape(d) != n) {
      throw py::value_error(std::string(name) + " has size " + std::to_string(a.shape(d)) + " in dimension " +
                            std::to_string(d) + ", expected " + std::to_string(n));
    }
    ++d;
  }
  return py::reinterpret_borrow<py::array_t<T>>(obj);
}

py::tuple sample_rows(const py::object& logits, const py::object& probs, const py::object& logprobs,
                      const py::object& top_p, const py::object& top_k, const py::object& uniform,
                      const py::object& greedy) {
  const py::object& any = !probs.is_none() ? probs : logits;
  if (any.is_none()) throw py::value_error("sample_rows needs probs, or logits when every row is greedy");
  if (!py::isinstance<py::array>(any)) {
    throw py::value_error(std::string(!probs.is_none() ? "probs" : "logits") + " must be a numpy array");
  }
  auto shape = py::reinterpret_borrow<py::array>(any);
  if (shape.ndim() != 2) throw py::value_error("logits / probs must be 2-d [rows, vocab]");
  const int64_t B = shape.shape(0), V = shape.shape(1);
  if (V < 1 || V > (int64_t{1} << 32)) throw py::value_error("vocab must be in [1, 2**32], got " + std::to_string(V));
  engine::SampleRowsArgs args;
  args.rows = B;
  args.vocab = V;
  py::array_t<float> lg, pr, lp;
  py::array_t<uint8_t> gr;
  if (!greedy.is_none()) {
    gr = checked<bool>(greedy, "greedy", {B}).attr("view")("uint8").cast<py::array_t<uint8_t>>();
    args.greedy = gr.data();
    lg = checked<float>(logits, "logits", {B, V});
    args.logits = lg.data();
  }
  if (!probs.is_none()) {
    pr = checked<float>(probs, "probs", {B, V});
    args.probs = pr.data();
  } else if (greedy.is_none()) {
    throw py::value_error("probs is required unless greedy marks every row");
  }
  if (!logprobs.is_none()) {
    lp = checked<float>(logprobs, "logprobs", {B, V});
    args.logprobs = lp.data();
  }
  auto tp = checked<float>(top_p, "top_p", {B});
  auto tk = checked<int64_t>(top_k, "top_k", {B});
  auto un = checked<double>(uniform, "uniform", {B});
  args.top_p = tp.data();
  args.top_k = tk.data();
  args.uniform = un.data();
  if (args.probs == nullptr) {  // every row must then be greedy
    for (int64_t r = 0; r < B; ++r) {
      if (!args.greedy[r]) throw py::value_error("probs is required unless greedy marks every row");
    }
  }
  py::array_t<int64_t> tokens(B);
  py::object chosen = py::none();
  py::array_t<double> chosen_arr;
  args.tokens = tokens.mutable_data();
  if (args.logprobs != nullptr) {
    chosen_arr = py::array_t<double>(B);
    args.chosen_logprobs = chosen_arr.mutable_data();
    chosen = chosen_arr;
  }
  {
    py::gil_scoped_release no_gil;  // the engine's host thread runs Python meanwhile (overlap)
    engine::sample_rows(args);
  }
  return py::make_tuple(tokens, chosen);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Host-side C++ for the engine: KV page allocator, radix prefix tree, the CPU sampler's row loop.";

  py::register_exception<engine::OutOfPages>(m, "OutOfPages", PyExc_RuntimeError);

  m.def("sample_rows", &sample_rows, py::arg("logits"), py::arg("probs"), py::arg("logprobs"), py::arg("top_p"),
        py::arg("top_k"), py::arg("uniform"), py::arg("greedy"),
        "One token per row on the CPU (csrc/sampler.h): (tokens int64 [B], logprobs[row, token] float64 [B] or\n"
        "None). logits float32 [B, V] (read for greedy rows; None without any), probs and logprobs float32\n"
        "[B, V] (exp(log_softmax(logits / T)) and its log; probs None only if every row is greedy, logprobs None\n"
        "when none is wanted), top_p float32 [B], top_k int64 [B], uniform float64 [B], greedy bool [B] or None.\n"
        "Arrays are read in place: exact dtypes, C-contiguous. A sampled row whose probs are not finite gets -1.");

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
