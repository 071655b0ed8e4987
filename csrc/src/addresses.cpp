#include "addresses.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <fstream>
#include <memory>

#include <fmt/format.h>

namespace tcpstore_barrier {
namespace {

bool familyOf(const std::string& numeric, int& family) {
  in6_addr raw6{};
  in_addr raw4{};
  const auto bare = numeric.substr(0, numeric.find('%'));
  if (::inet_pton(AF_INET, bare.c_str(), &raw4) == 1) {
    family = AF_INET;
    return true;
  }
  if (::inet_pton(AF_INET6, bare.c_str(), &raw6) == 1) {
    family = AF_INET6;
    return true;
  }
  return false;
}

// This host's up, non-loopback addresses of `family`, in interface order,
// link-local ones last (with their `%interface`).
std::vector<std::string> interfaceAddresses(int family) {
  ifaddrs* raw = nullptr;
  if (::getifaddrs(&raw) != 0) {
    return {};
  }
  std::unique_ptr<ifaddrs, void (*)(ifaddrs*)> all(raw, ::freeifaddrs);
  std::vector<std::string> global;
  std::vector<std::string> linkLocal;
  for (const ifaddrs* i = all.get(); i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != family ||
        (i->ifa_flags & IFF_UP) == 0 || (i->ifa_flags & IFF_LOOPBACK) != 0) {
      continue;
    }
    const socklen_t length =
        family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
    char text[NI_MAXHOST] = {};
    if (::getnameinfo(
            i->ifa_addr,
            length,
            text,
            sizeof(text),
            nullptr,
            0,
            NI_NUMERICHOST) != 0 ||
        isLoopbackAddress(text)) {
      continue;
    }
    const bool local =
        family == AF_INET6 &&
        IN6_IS_ADDR_LINKLOCAL(
            &reinterpret_cast<const sockaddr_in6*>(i->ifa_addr)->sin6_addr);
    (local ? linkLocal : global).emplace_back(text);
  }
  global.insert(global.end(), linkLocal.begin(), linkLocal.end());
  return global;
}

std::string firstLine(const char* path) {
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);
  return line;
}

} // namespace

bool isLoopbackAddress(const std::string& numeric) {
  const auto bare = numeric.substr(0, numeric.find('%'));
  in_addr raw4{};
  if (::inet_pton(AF_INET, bare.c_str(), &raw4) == 1) {
    return (ntohl(raw4.s_addr) >> 24) == 127;
  }
  in6_addr raw6{};
  if (::inet_pton(AF_INET6, bare.c_str(), &raw6) == 1) {
    return IN6_IS_ADDR_LOOPBACK(&raw6) ||
           (IN6_IS_ADDR_V4MAPPED(&raw6) && raw6.s6_addr[12] == 127);
  }
  return false;
}

LeaderAddresses leaderAddresses(const std::string& local) {
  int family = AF_INET;
  if (!isLoopbackAddress(local) || !familyOf(local, family)) {
    return {local, {local}};
  }
  LeaderAddresses chosen;
  chosen.bind = family == AF_INET6 ? "::" : "0.0.0.0";
  chosen.published.emplace_back(kRootHostAlias);
  if (family == AF_INET6) {
    // The IPv6 wildcard takes IPv4 connections too.
    for (auto& address : interfaceAddresses(AF_INET6)) {
      chosen.published.push_back(std::move(address));
    }
  }
  for (auto& address : interfaceAddresses(AF_INET)) {
    chosen.published.push_back(std::move(address));
  }
  // Never loopback: on another host it is another host's server. Members
  // on this host reach it as they reach rank 0's store.
  return chosen;
}

std::string defaultHostIdentity(const std::string& localAddress) {
  char name[256] = {};
  ::gethostname(name, sizeof(name) - 1);
  struct stat netns{};
  const bool known = ::stat("/proc/self/ns/net", &netns) == 0;
  return fmt::format(
      "{}/{}/{}:{}",
      name,
      localAddress,
      firstLine("/proc/sys/kernel/random/boot_id"),
      known ? static_cast<unsigned long long>(netns.st_ino) : 0ULL);
}

} // namespace tcpstore_barrier
