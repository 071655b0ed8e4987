#include "arguments.h"

#include <cmath>
#include <stdexcept>

#include <fmt/format.h>

namespace tcpstore_barrier {
namespace {

// TCPStore keeps timeouts in milliseconds; beyond this a timeout is a typo.
constexpr double kMaxTimeoutSeconds = 365.0 * 24 * 3600;

} // namespace

uint16_t checkedPort(int64_t port) {
  if (port < 1 || port > 65535) {
    throw std::invalid_argument(
        fmt::format("tcpstore_port must be in 1..65535, got {}", port));
  }
  return static_cast<uint16_t>(port);
}

std::chrono::milliseconds checkedTimeout(double seconds, const char* name) {
  if (std::isnan(seconds) || seconds < 0 || seconds > kMaxTimeoutSeconds) {
    throw std::invalid_argument(
        fmt::format(
            "{} must be a number of seconds in [0, {:g}], got {}",
            name,
            kMaxTimeoutSeconds,
            seconds));
  }
  return std::chrono::milliseconds(std::llround(seconds * 1000.0));
}

void checkNonNegative(std::chrono::milliseconds timeout, const char* name) {
  if (timeout.count() < 0) {
    throw std::invalid_argument(
        fmt::format(
            "{} must not be negative, got {} ms", name, timeout.count()));
  }
}

void checkPositive(std::chrono::milliseconds timeout, const char* name) {
  if (timeout.count() <= 0) {
    throw std::invalid_argument(
        fmt::format(
            "{} must be positive (None turns it off), got {} ms",
            name,
            timeout.count()));
  }
}

void checkRankAndWorld(int64_t rank, int64_t worldSize) {
  if (worldSize < 1) {
    throw std::invalid_argument(
        fmt::format("global_world_size must be at least 1, got {}", worldSize));
  }
  if (rank < 0 || rank >= worldSize) {
    throw std::invalid_argument(
        fmt::format(
            "global_rank must be in [0, global_world_size={}), got {}",
            worldSize,
            rank));
  }
}

std::string describeSeconds(std::chrono::milliseconds duration) {
  return fmt::format("{:g} s", static_cast<double>(duration.count()) / 1000.0);
}

void checkAddress(const std::string& address) {
  if (address.empty()) {
    throw std::invalid_argument("master_address must not be empty");
  }
  if (address.find('\0') != std::string::npos) {
    throw std::invalid_argument(
        "master_address must not contain a NUL character");
  }
}

} // namespace tcpstore_barrier
