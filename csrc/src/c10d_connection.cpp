// A StoreConnection over c10d's Store API, for stores that are not TCPStores
// (a HashStore, a FileStore). Deadlines hold only as far as that store's own
// timeouts do; nothing here can cut a call to it short.
#include <poll.h>

#include <algorithm>
#include <utility>

#include <c10/util/Type.h>
#include <fmt/format.h>

#include "store_connection.h"

namespace tcpstore_barrier {
namespace {

// How often a waiting rank looks for the release: these stores are not
// for hot paths, and a slice also bounds how late the alarm is seen.
constexpr std::chrono::milliseconds kPollSlice{10};

std::vector<uint8_t> bytesOf(std::string_view text) {
  return {text.begin(), text.end()};
}

std::string textOf(const std::vector<uint8_t>& bytes) {
  return {bytes.begin(), bytes.end()};
}

// Every call goes through guarded(): whatever the store throws becomes
// StoreUnavailable, the one failure the barrier acts on (it marks itself
// lost, and the worker raises the alarm), with c10's backtrace left out.
class C10dConnection final : public StoreConnection {
 public:
  explicit C10dConnection(c10::intrusive_ptr<c10d::Store> store)
      : store_(std::move(store)),
        description_(
            fmt::format(
                "the store given to from_store ({})",
                c10::demangle(typeid(*store_).name()))) {}

  void set(std::string_view key, std::string_view value) override {
    guarded([&] {
      store_->set(std::string(key), bytesOf(value));
    });
  }

  void flush(Clock::time_point) override {}

  void sendAdd(
      std::string_view key, int64_t delta, Clock::time_point) override {
    added_ = guarded([&] {
      return store_->add(std::string(key), delta);
    });
  }

  void addEach(
      const std::vector<std::string>& keys,
      int64_t delta,
      Clock::time_point) override {
    guarded([&] {
      for (const auto& key : keys) {
        store_->add(key, delta);
      }
    });
  }

  bool replyReady(Clock::time_point) override {
    return true;
  }

  int64_t readAdd(Clock::time_point) override {
    return added_;
  }

  bool check(const std::vector<std::string>& keys, Clock::time_point) override {
    return guarded([&] {
      return store_->check(keys);
    });
  }

  std::vector<bool> checkEach(
      const std::vector<std::string>& keys, Clock::time_point) override {
    return guarded([&] {
      std::vector<bool> exists;
      exists.reserve(keys.size());
      for (const auto& key : keys) {
        exists.push_back(store_->check({key}));
      }
      return exists;
    });
  }

  std::vector<std::string> multiGet(
      const std::vector<std::string>& keys, Clock::time_point) override {
    return guarded([&] {
      std::vector<std::string> values;
      values.reserve(keys.size());
      for (const auto& key : keys) {
        values.push_back(textOf(store_->get(key)));
      }
      return values;
    });
  }

  std::vector<bool> deleteEach(
      const std::vector<std::string>& keys, Clock::time_point) override {
    return guarded([&] {
      std::vector<bool> existed;
      existed.reserve(keys.size());
      for (const auto& key : keys) {
        existed.push_back(store_->deleteKey(key));
      }
      return existed;
    });
  }

  std::string compareSet(
      std::string_view key,
      std::string_view expected,
      std::string_view desired,
      Clock::time_point) override {
    return guarded([&] {
      return textOf(store_->compareSet(
          std::string(key), bytesOf(expected), bytesOf(desired)));
    });
  }

  void startWait(std::string_view key, Clock::time_point) override {
    waitedKey_.assign(1, std::string(key));
  }

  void startServerBarrier(
      std::string_view, int64_t, Clock::time_point) override {
    throw std::invalid_argument(
        "protocol 'native' needs a TCPStore (or a PrefixStore over one)");
  }

  void startWaitAll(
      const std::vector<std::string>& keys, Clock::time_point) override {
    waitedKey_ = keys;
  }

  bool awaitRelease(Clock::time_point until, int alarmFd) override {
    // Polled with check(): stores report an elapsed wait() only as an error,
    // which cannot be told from a failing store, and FileStore's wait()
    // lasts whole seconds.
    for (;;) {
      if (guarded([&] {
            return store_->check(waitedKey_);
          })) {
        return true;
      }
      const auto now = Clock::now();
      if (now >= until) {
        return false;
      }
      const int sliceMs = static_cast<int>(std::min<int64_t>(
          kPollSlice.count(),
          std::chrono::ceil<std::chrono::milliseconds>(until - now).count()));
      pollfd pfd{alarmFd, POLLIN, 0};
      if (::poll(&pfd, alarmFd >= 0 ? 1 : 0, sliceMs) > 0) {
        return false;
      }
    }
  }

  bool idle() const noexcept override {
    return true;
  }

  void abort() noexcept override {}

  const std::string& describe() const override {
    return description_;
  }

 private:
  template <typename Call>
  auto guarded(Call call) -> decltype(call()) {
    try {
      return call();
    } catch (const std::exception& e) {
      throw StoreUnavailable(
          fmt::format("{} failed: {}", description_, withoutBacktrace(e)),
          false);
    }
  }

  c10::intrusive_ptr<c10d::Store> store_;
  std::string description_;
  std::vector<std::string> waitedKey_;
  int64_t added_ = 0;
};

} // namespace

std::unique_ptr<StoreConnection> openC10dConnection(
    c10::intrusive_ptr<c10d::Store> store) {
  return std::make_unique<C10dConnection>(std::move(store));
}

// c10 errors append a C++ backtrace to what(); a message that wraps one
// carries only its text.
const char* withoutBacktrace(const std::exception& e) {
  if (const auto* error = dynamic_cast<const c10::Error*>(&e)) {
    return error->what_without_backtrace();
  }
  return e.what();
}

} // namespace tcpstore_barrier
