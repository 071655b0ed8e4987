// What differs between the torch versions we build against, in one place.
#pragma once

// TCPStore's wire protocol (QueryType and friends) moved into store/ in 2.14.
#if __has_include(<torch/csrc/distributed/c10d/store/TCPStoreBackend.hpp>)
#include <torch/csrc/distributed/c10d/store/TCPStoreBackend.hpp>
#else
#include <torch/csrc/distributed/c10d/TCPStoreBackend.hpp>
#endif
