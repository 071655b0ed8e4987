// Argument checks shared by every entry point (the C++ constructors and the
// Python bindings), so that each rejects the same values with the same
// message, naming the argument, before any socket is opened.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace tcpstore_barrier {

// Each throws std::invalid_argument.
uint16_t checkedPort(int64_t port);
std::chrono::milliseconds checkedTimeout(double seconds, const char* name);
void checkNonNegative(std::chrono::milliseconds timeout, const char* name);
void checkPositive(std::chrono::milliseconds timeout, const char* name);
void checkRankAndWorld(int64_t rank, int64_t worldSize);
void checkAddress(const std::string& address);

// "2.5 s": a duration as the messages that name a timeout write it.
std::string describeSeconds(std::chrono::milliseconds duration);

} // namespace tcpstore_barrier
