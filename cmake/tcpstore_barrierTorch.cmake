# torch's CPU parts as one imported target, tcpstore_barrier::torch_cpu.
#
# Used by our own build and shipped in our CMake package, so that C++
# trainers get exactly the target the library was built with.
#
# Why not find_package(Torch): on a CUDA build of torch (the default wheel on
# Linux) TorchConfig.cmake requires a CUDA toolkit and stops without one, yet
# the barrier only uses c10 and c10d, which live in libc10 and libtorch_cpu.
# torch.utils.cpp_extension builds CPU-only extensions the same way: include
# dirs and libraries from torch's install prefix, nothing else.
#
#   tcpstore_barrier_torch_target(<torch prefix> <cxx11 abi: 0|1>)
#
# <torch prefix> is torch's package directory (site-packages/torch).

function(tcpstore_barrier_torch_target prefix cxx11_abi)
  if(TARGET tcpstore_barrier::torch_cpu)
    return()
  endif()
  foreach(lib c10 torch_cpu)
    set(location "${prefix}/lib/${CMAKE_SHARED_LIBRARY_PREFIX}${lib}${CMAKE_SHARED_LIBRARY_SUFFIX}")
    if(NOT EXISTS "${location}")
      message(FATAL_ERROR
        "tcpstore_barrier: ${location} does not exist; is '${prefix}' an "
        "installed torch package?")
    endif()
    add_library(tcpstore_barrier::lib${lib} SHARED IMPORTED)
    set_target_properties(tcpstore_barrier::lib${lib} PROPERTIES
      IMPORTED_LOCATION "${location}"
      IMPORTED_SONAME "${CMAKE_SHARED_LIBRARY_PREFIX}${lib}${CMAKE_SHARED_LIBRARY_SUFFIX}")
  endforeach()

  add_library(tcpstore_barrier::torch_cpu INTERFACE IMPORTED)
  set_target_properties(tcpstore_barrier::torch_cpu PROPERTIES
    # Imported, hence system includes: -Wall -Wextra stay quiet on torch's headers.
    INTERFACE_INCLUDE_DIRECTORIES
      "${prefix}/include;${prefix}/include/torch/csrc/api/include"
    INTERFACE_LINK_LIBRARIES "tcpstore_barrier::libtorch_cpu;tcpstore_barrier::libc10"
    # What torch_cpu's own target asks for, of what the c10d and pybind
    # headers look at (Exceptions.h maps c10d's errors only with
    # USE_DISTRIBUTED), and the libstdc++ ABI torch was built with, as
    # torch.utils.cpp_extension passes it.
    INTERFACE_COMPILE_DEFINITIONS "USE_DISTRIBUTED;_GLIBCXX_USE_CXX11_ABI=${cxx11_abi}"
    # torch is C++20 (its own target sets CXX_STANDARD 20, which does not
    # propagate); torch 2.14's headers no longer compile as C++17.
    INTERFACE_COMPILE_FEATURES cxx_std_20)
endfunction()
