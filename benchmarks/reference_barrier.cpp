// The bench's reference barrier: torch's three requests a round and nothing
// else (no timeout naming, no resume, no key cleanup, no Ctrl-C), in C++
// with the GIL released. Whatever ours spends beyond this is our overhead.
#include <torch/csrc/utils/pybind.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace py = pybind11;

namespace {

class ReferenceBarrier {
 public:
  ReferenceBarrier(
      c10::intrusive_ptr<c10d::Store> store,
      int64_t rank,
      int64_t worldSize,
      std::string prefix)
      : store_(std::move(store)),
        rank_(rank),
        worldSize_(worldSize),
        prefix_(std::move(prefix)) {}

  // Round s as torch.distributed.elastic.utils.store.barrier runs it, except
  // that the last arriver does not wait for the key it has just set.
  void executeBarrier() {
    const std::string round = prefix_ + std::to_string(sequence_);
    store_->set("rank" + std::to_string(rank_), std::to_string(sequence_));
    if (store_->add(round + "/num_members", 1) == worldSize_) {
      store_->set(round + "/last_member", "<val_ignored>");
    } else {
      store_->wait({round + "/last_member"});
    }
    ++sequence_;
  }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  int64_t rank_;
  int64_t worldSize_;
  std::string prefix_;
  int64_t sequence_ = 0;
};

} // namespace

PYBIND11_MODULE(_reference, m) {
  py::class_<ReferenceBarrier>(m, "ReferenceBarrier")
      .def(
          py::init<
              c10::intrusive_ptr<c10d::Store>,
              int64_t,
              int64_t,
              std::string>(),
          py::arg("store"),
          py::arg("rank"),
          py::arg("world_size"),
          py::arg("prefix"))
      .def(
          "execute_barrier",
          &ReferenceBarrier::executeBarrier,
          py::call_guard<py::gil_scoped_release>());
}
