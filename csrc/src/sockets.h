#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace tcpstore_barrier {

// Owns a file descriptor until it is released to a new owner.
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) noexcept : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const noexcept {
    return fd_;
  }
  int release() noexcept {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// A listening TCP socket bound to `host`'s address (not the wildcard), for
// TCPStoreOptions::masterListenFd. Throws c10::DistNetworkError naming the
// host and port when the name does not resolve or the port is taken.
UniqueFd openListenSocket(const std::string& host, uint16_t port);

// Returns once a TCP connection to `host`:`port` succeeds, retrying refused
// connections with short back-offs until `deadline`. A name that does not
// resolve fails at once. Throws c10::DistNetworkError with the last cause.
//
// TCPStore's client waits out its whole timeout on a refused connection,
// sleeps, then tries again with another whole timeout, so on its own it
// overshoots timeout_barrier_init_secs by up to twice over.
void waitUntilReachable(
    const std::string& host,
    uint16_t port,
    std::chrono::steady_clock::time_point deadline);

} // namespace tcpstore_barrier
