#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

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

// A nonblocking eventfd, to wake a thread that polls it; -1 if the kernel
// refused one (the thread then wakes only at its deadlines).
UniqueFd makeEventFd();
// Makes `eventFd` readable (it stays so until read).
void postEvent(int eventFd) noexcept;

// A listening TCP socket for TCPStoreOptions::masterListenFd, where the
// hosts that resolve `host` can reach it: a literal address, `localhost`, or
// a name resolving only to addresses other than loopback is bound to the
// (first usable) address itself; a name that resolves to a loopback address
// here (a Debian-default host's own name, 127.0.1.1) is bound to the
// wildcard, as TCPStore's own server is, and says so in one log line: other
// hosts resolve that name to an address of this host that it does not know.
// Throws c10::DistNetworkError naming the host and port when the name does
// not resolve or the port is taken.
UniqueFd openListenSocket(const std::string& host, uint16_t port);

// Whether a refused connection is tried again: a server may not listen
// yet when a job starts, while one that listened and refuses now is gone.
enum class Refused { kRetry, kFinal };

// A non-blocking TCP connection to `host`:`port` (or, failing that, to one
// of `otherHosts` in order: addresses of the same server), retrying refused
// connections with short back-offs until `deadline` (kRetry). A name that
// does not resolve fails at once. Throws c10::DistNetworkError with the
// last cause.
UniqueFd connectSocket(
    const std::string& host,
    uint16_t port,
    std::chrono::steady_clock::time_point deadline,
    const std::vector<std::string>& otherHosts = {},
    Refused refused = Refused::kRetry);

// The address (numeric, with `%interface` for an IPv6 link-local one) and
// port a socket is bound to locally: for a connection, the address this
// host uses to reach its peer.
std::string localAddress(int fd);
// The numeric address a connection's peer has, in the same form.
std::string peerAddress(int fd);
uint16_t localPort(int fd);

// Options of a store connection: no Nagle delay, and kernel-level failure
// detection scaled to `silenceLimit`.
void tuneStoreSocket(int fd, std::chrono::milliseconds silenceLimit);

} // namespace tcpstore_barrier
