// Python bindings: argument conversion and GIL policy only; the barrier
// itself lives in csrc/.
#include <torch/csrc/utils/pybind.h>

#include <tcpstore_barrier/tcpstore_barrier.h>

#include "binding_support.h"

namespace py = pybind11;
using namespace tcpstore_barrier;
using tcpstore_barrier::detail::BarrierAccess;

namespace {

constexpr std::chrono::milliseconds kArrivalWithGil{20};

[[noreturn]] void wrongType(
    const char* name, const char* expected, py::handle value) {
  throw py::type_error(
      py::str("{} must be {}, got {} {!r}")
          .format(name, expected, Py_TYPE(value.ptr())->tp_name, value)
          .cast<std::string>());
}

int64_t intArg(py::handle value, const char* name) {
  if (!PyLong_Check(value.ptr())) {
    wrongType(name, "an int", value);
  }
  int overflow = 0;
  const long long result = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (overflow != 0) {
    throw py::value_error(
        py::str("{} is out of range, got {!r}")
            .format(name, value)
            .cast<std::string>());
  }
  return result;
}

std::chrono::milliseconds secondsArg(py::handle value, const char* name) {
  if (PyBool_Check(value.ptr()) ||
      !(PyLong_Check(value.ptr()) || PyFloat_Check(value.ptr()))) {
    wrongType(name, "a number of seconds (int or float)", value);
  }
  return checkedTimeout(PyFloat_AsDouble(value.ptr()), name);
}

std::string strArg(py::handle value, const char* name) {
  if (!PyUnicode_Check(value.ptr())) {
    wrongType(name, "a str", value);
  }
  Py_ssize_t size = 0;
  const char* utf8 = PyUnicode_AsUTF8AndSize(value.ptr(), &size);
  if (utf8 == nullptr) {
    PyErr_Clear();
    throw py::value_error(
        py::str("{} must be encodable as UTF-8, got {!r}")
            .format(name, value)
            .cast<std::string>());
  }
  return std::string(utf8, static_cast<std::size_t>(size));
}

bool boolArg(py::handle value, const char* name) {
  if (!PyBool_Check(value.ptr())) {
    wrongType(name, "a bool", value);
  }
  return value.ptr() == Py_True;
}

std::optional<std::chrono::milliseconds> peerTimeoutArg(py::handle value) {
  if (value.is_none()) {
    return std::nullopt;
  }
  return secondsArg(value, "peer_timeout_secs");
}

py::list ranksOf(const std::vector<int64_t>& ranks) {
  return py::cast(ranks);
}

Protocol protocolArg(py::handle value) {
  const std::string protocol = strArg(value, "protocol");
  if (protocol == "torch") {
    return Protocol::kTorch;
  }
  if (protocol == "native") {
    return Protocol::kNative;
  }
  throw py::value_error(
      "protocol must be 'torch' or 'native', got '" + protocol + "'");
}

TreeOptions treeArgs(
    py::handle topologyValue, py::handle host, py::handle fanIn) {
  const std::string topology = strArg(topologyValue, "topology");
  TreeOptions tree;
  if (topology == "flat") {
    tree.topology = Topology::kFlat;
  } else if (topology == "tree") {
    tree.topology = Topology::kTree;
  } else if (topology != "auto") {
    throw py::value_error(
        "topology must be 'auto', 'flat' or 'tree', got '" + topology + "'");
  }
  if (!host.is_none()) {
    tree.host = strArg(host, "host");
  }
  tree.fanIn = intArg(fanIn, "tree_fan_in");
  return tree;
}

bool pythonFinalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Destroying a barrier may block for a while (a host whose round ended in
// an error keeps the store up for the survivors): let other Python threads
// run meanwhile, unless the interpreter is shutting down.
struct DeleteWithoutGil {
  void operator()(TCPStoreBarrier* barrier) const noexcept {
    if (PyGILState_Check() != 0 && !pythonFinalizing()) {
      py::gil_scoped_release nogil;
      delete barrier;
    } else {
      delete barrier;
    }
  }
};
using BarrierHolder = std::unique_ptr<TCPStoreBarrier, DeleteWithoutGil>;

BarrierHolder withSignalChecks(std::unique_ptr<TCPStoreBarrier> barrier) {
  // Lets Ctrl-C and other Python signal handlers run while a rank waits
  // without the GIL.
  barrier->setInterruptCheck([] {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      throw py::error_already_set();
    }
  });
  return BarrierHolder(barrier.release());
}

} // namespace

PYBIND11_MODULE(_C, m) {
  py::register_local_exception_translator([](std::exception_ptr error) {
    try {
      std::rethrow_exception(error);
    } catch (const PeerLostError& e) {
      py::object type =
          py::module_::import("tcpstore_barrier._errors").attr("PeerLostError");
      py::object exception = type(
          e.what_without_backtrace(),
          ranksOf(e.missingRanks()),
          e.barrierKey(),
          e.sequence(),
          std::chrono::duration<double>(e.timeout()).count(),
          ranksOf(e.lostRanks()));
      PyErr_SetObject(type.ptr(), exception.ptr());
    } catch (const BarrierTimeoutError& e) {
      py::object type = py::module_::import("tcpstore_barrier._errors")
                            .attr("BarrierTimeoutError");
      py::object exception = type(
          e.what_without_backtrace(),
          ranksOf(e.missingRanks()),
          e.barrierKey(),
          e.sequence(),
          std::chrono::duration<double>(e.timeout()).count());
      PyErr_SetObject(type.ptr(), exception.ptr());
    } catch (const StoreUnreachableError& e) {
      py::object type = py::module_::import("tcpstore_barrier._errors")
                            .attr("StoreUnreachableError");
      py::object exception = type(
          e.what_without_backtrace(), e.sequence(), ranksOf(e.lostRanks()));
      PyErr_SetObject(type.ptr(), exception.ptr());
    }
  });

  py::class_<TCPStoreBarrier, BarrierHolder>(m, "TCPStoreBarrier")
      .def(
          py::init([](py::handle global_rank,
                      py::handle global_world_size,
                      py::handle barrier_prefix,
                      py::handle timeout_barrier_init_secs,
                      py::handle use_checkpoint_barrier_tcpstore_libuv,
                      py::handle tcpstore_port,
                      py::handle master_address,
                      py::handle timeout_secs,
                      py::handle protocol,
                      py::handle peer_timeout_secs,
                      py::handle topology,
                      py::handle host,
                      py::handle tree_fan_in) {
            TCPStoreBarrierOptions options{
                intArg(global_rank, "global_rank"),
                intArg(global_world_size, "global_world_size"),
                strArg(barrier_prefix, "barrier_prefix"),
                secondsArg(
                    timeout_barrier_init_secs, "timeout_barrier_init_secs"),
                boolArg(
                    use_checkpoint_barrier_tcpstore_libuv,
                    "use_checkpoint_barrier_tcpstore_libuv"),
                intArg(tcpstore_port, "tcpstore_port"),
                strArg(master_address, "master_address"),
                secondsArg(timeout_secs, "timeout_secs"),
                protocolArg(protocol),
                peerTimeoutArg(peer_timeout_secs),
                treeArgs(topology, host, tree_fan_in)};
            py::gil_scoped_release nogil;
            return withSignalChecks(
                std::make_unique<TCPStoreBarrier>(std::move(options)));
          }),
          py::arg("global_rank"),
          py::arg("global_world_size"),
          py::arg("barrier_prefix"),
          py::arg("timeout_barrier_init_secs"),
          py::arg("use_checkpoint_barrier_tcpstore_libuv"),
          py::arg("tcpstore_port"),
          py::arg("master_address"),
          py::arg("timeout_secs"),
          py::kw_only(),
          py::arg("protocol") = "torch",
          py::arg("peer_timeout_secs") = 5.0,
          py::arg("topology") = "auto",
          py::arg("host") = py::none(),
          py::arg("tree_fan_in") = kDefaultTreeFanIn)
      // TCPStoreBarrier.from_store in Python: joins a store the program has.
      .def(
          py::init([](c10::intrusive_ptr<c10d::Store> store,
                      py::handle global_rank,
                      py::handle global_world_size,
                      py::handle barrier_prefix,
                      py::handle timeout_secs,
                      py::handle protocol,
                      py::handle peer_timeout_secs,
                      py::handle topology,
                      py::handle host,
                      py::handle tree_fan_in) {
            auto rank = intArg(global_rank, "global_rank");
            auto worldSize = intArg(global_world_size, "global_world_size");
            auto prefix = strArg(barrier_prefix, "barrier_prefix");
            auto timeout = secondsArg(timeout_secs, "timeout_secs");
            auto peerTimeout = peerTimeoutArg(peer_timeout_secs);
            auto kind = protocolArg(protocol);
            auto tree = treeArgs(topology, host, tree_fan_in);
            py::gil_scoped_release nogil;
            return withSignalChecks(
                std::make_unique<TCPStoreBarrier>(
                    std::move(store),
                    rank,
                    worldSize,
                    std::move(prefix),
                    timeout,
                    kind,
                    peerTimeout,
                    std::move(tree)));
          }),
          py::arg("store"),
          py::arg("global_rank"),
          py::arg("global_world_size"),
          py::arg("barrier_prefix"),
          py::arg("timeout_secs"),
          py::kw_only(),
          py::arg("protocol") = "torch",
          py::arg("peer_timeout_secs") = 5.0,
          py::arg("topology") = "auto",
          py::arg("host") = py::none(),
          py::arg("tree_fan_in") = kDefaultTreeFanIn)
      .def(
          "execute_barrier",
          &TCPStoreBarrier::executeBarrier,
          py::call_guard<py::gil_scoped_release>())
      .def(
          "arrive",
          [](TCPStoreBarrier& self) {
            // The arrival is one round trip: waiting for it with the GIL
            // held is far cheaper than getting the GIL back from a busy
            // Python thread (a switch interval, 5 ms). Only a store slow
            // to answer makes us let go of it.
            BarrierAccess::sendArrival(self);
            if (BarrierAccess::arrivalAnswered(self, kArrivalWithGil)) {
              self.arrive();
              return;
            }
            py::gil_scoped_release nogil;
            self.arrive();
          },
          "Enters the current round and returns once this rank's arrival "
          "reached the store, "
          "without waiting for the other ranks.")
      .def(
          "wait",
          [](TCPStoreBarrier& self) {
            // A released round completes without a store round trip, so
            // keep the GIL rather than pay for giving it back.
            if (self.released()) {
              self.wait();
              return;
            }
            py::gil_scoped_release nogil;
            self.wait();
          },
          "Returns once the round entered by arrive() has released; at once, "
          "keeping the GIL, if it has.")
      .def(
          "close",
          &TCPStoreBarrier::close,
          py::call_guard<py::gil_scoped_release>(),
          "Leaves the store; on rank 0, first waits (up to timeout_secs) for "
          "the other ranks to close.")
      .def(
          "__enter__",
          [](py::object self) {
            return self;
          })
      .def(
          "__exit__",
          [](TCPStoreBarrier& self, const py::args&) {
            self.close();
          },
          py::call_guard<py::gil_scoped_release>())
      .def_property_readonly(
          "sequence",
          &TCPStoreBarrier::sequence,
          "The sequence number of the next round.")
      .def_property_readonly(
          "uses_libuv",
          &TCPStoreBarrier::usesLibUV,
          "Whether the store's server is libuv's.")
      .def_property_readonly(
          "released",
          &TCPStoreBarrier::released,
          "Whether the round entered by arrive() has released, so wait() "
          "returns at once.")
      .def_property_readonly(
          "closed", &TCPStoreBarrier::closed, "Whether close() was called.")
      .def_property_readonly("global_rank", &TCPStoreBarrier::rank)
      .def_property_readonly("global_world_size", &TCPStoreBarrier::worldSize)
      .def_property_readonly("barrier_prefix", &TCPStoreBarrier::barrierPrefix)
      .def_property_readonly(
          "timeout_secs",
          [](const TCPStoreBarrier& self) {
            return std::chrono::duration<double>(self.timeout()).count();
          })
      .def_property_readonly(
          "protocol",
          [](const TCPStoreBarrier& self) {
            return self.protocol() == Protocol::kNative ? "native" : "torch";
          })
      .def_property_readonly(
          "topology",
          [](const TCPStoreBarrier& self) {
            return self.topology() == Topology::kTree ? "tree" : "flat";
          },
          "'flat' or 'tree', as chosen at construction.")
      .def_property_readonly(
          "tree_levels",
          &TCPStoreBarrier::treeLevels,
          "How many stores of the tree this rank meets at (1 when flat).")
      .def_property_readonly(
          "peer_timeout_secs",
          [](const TCPStoreBarrier& self) -> std::optional<double> {
            if (auto limit = self.peerTimeout()) {
              return std::chrono::duration<double>(*limit).count();
            }
            return std::nullopt;
          })
      .def_property_readonly(
          "store",
          py::cpp_function(
              &TCPStoreBarrier::store,
              py::call_guard<py::gil_scoped_release>()),
          "A torch.distributed.Store on the barrier's store (on ranks other "
          "than 0, "
          "a client opened on first use).")
      .def("__repr__", [](const TCPStoreBarrier& self) {
        return py::str(
                   "TCPStoreBarrier(global_rank={}, global_world_size={}, "
                   "barrier_prefix={!r}, "
                   "sequence={}, protocol={!r})")
            .format(
                self.rank(),
                self.worldSize(),
                self.barrierPrefix(),
                self.sequence(),
                self.protocol() == Protocol::kNative ? "native" : "torch");
      });
}
