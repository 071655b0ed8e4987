#pragma once

// What differs between the torch versions we build against, in one place.
// CMake finds which case applies by compiling against the installed torch
// (see "torch" in CMakeLists.txt) and passes it in as a definition.

// c10d's TCPStore wire protocol: c10d::detail::QueryType, CheckResponseType,
// WaitResponseType and validationMagicNumber. torch 2.14 moved the header
// into store/; the definitions are unchanged.
#if !defined(TCPSTORE_BARRIER_TCPSTOREBACKEND_IN_STORE_DIR)
#error \
    "TCPSTORE_BARRIER_TCPSTOREBACKEND_IN_STORE_DIR is set by CMakeLists.txt on the tcpstore_barrier target"
#elif TCPSTORE_BARRIER_TCPSTOREBACKEND_IN_STORE_DIR
#include <torch/csrc/distributed/c10d/store/TCPStoreBackend.hpp> // torch 2.14
#else
#include <torch/csrc/distributed/c10d/TCPStoreBackend.hpp> // torch 2.13
#endif
