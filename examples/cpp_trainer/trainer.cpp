// A toy training loop with a checkpoint barrier. Each step, every rank
// writes its shard of the checkpoint, then waits at the barrier: once it
// returns, every rank's shard of this step is on disk, so the previous
// step's shard can be deleted without ever leaving no complete checkpoint.
//
//   trainer --rank R --world-size W --port P [--iterations N]
//           [--master-address ADDR] [--prefix PREFIX] [--timeout SECS]
//           [--init-timeout SECS] [--checkpoint-dir DIR] [--no-libuv]
//
// Rank 0 hosts the TCPStore on ADDR:P; the others connect to it, and may be
// Python ranks using tcpstore_barrier or torch's own TCPStoreBarrier. Each
// step prints one line with the wall-clock times (seconds since the epoch)
// at which this rank entered and left the barrier.
//
// Exit status: 0 on success, 1 when a barrier times out or the store fails,
// 2 for bad arguments.
#include <tcpstore_barrier/tcpstore_barrier.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Args {
  int64_t rank = -1;
  int64_t worldSize = -1;
  int64_t port = -1;
  int64_t iterations = 10;
  std::string masterAddress = "127.0.0.1";
  std::string prefix = "ckpt";
  int64_t timeoutSecs = 300;
  int64_t initTimeoutSecs = 60;
  bool useLibUV = true;
  std::filesystem::path checkpointDir = "checkpoints";
};

constexpr const char* kUsage =
    "usage: trainer --rank R --world-size W --port P [--iterations N]\n"
    "               [--master-address ADDR] [--prefix PREFIX] "
    "[--timeout SECS]\n"
    "               [--init-timeout SECS] [--checkpoint-dir DIR] "
    "[--no-libuv]\n";

int64_t toInt(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::logic_error&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw std::invalid_argument(flag + " needs an integer, got '" + text + "'");
  }
  return value;
}

Args parseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--no-libuv") {
      args.useLibUV = false;
      continue;
    }
    if (i + 1 >= argc) {
      throw std::invalid_argument(flag + " needs a value");
    }
    const std::string value = argv[++i];
    if (flag == "--rank") {
      args.rank = toInt(flag, value);
    } else if (flag == "--world-size") {
      args.worldSize = toInt(flag, value);
    } else if (flag == "--port") {
      args.port = toInt(flag, value);
    } else if (flag == "--iterations") {
      args.iterations = toInt(flag, value);
    } else if (flag == "--master-address") {
      args.masterAddress = value;
    } else if (flag == "--prefix") {
      args.prefix = value;
    } else if (flag == "--timeout") {
      args.timeoutSecs = toInt(flag, value);
    } else if (flag == "--init-timeout") {
      args.initTimeoutSecs = toInt(flag, value);
    } else if (flag == "--checkpoint-dir") {
      args.checkpointDir = value;
    } else {
      throw std::invalid_argument("unknown argument " + flag);
    }
  }
  if (args.rank < 0 || args.worldSize < 0 || args.port < 0) {
    throw std::invalid_argument("--rank, --world-size and --port are required");
  }
  if (args.port < 1 || args.port > 65535) {
    throw std::invalid_argument("--port must be in 1..65535");
  }
  if (args.iterations < 0) {
    throw std::invalid_argument("--iterations must not be negative");
  }
  return args;
}

double wallClockSeconds() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

std::filesystem::path shardPath(const Args& args, int64_t step) {
  return args.checkpointDir / ("step" + std::to_string(step) + "-rank" +
                               std::to_string(args.rank) + ".bin");
}

// Stands in for torch::save of this rank's part of the model state.
void writeShard(const Args& args, int64_t step) {
  std::vector<char> state(64 * 1024, static_cast<char>(step + args.rank));
  const auto path = shardPath(args, step);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(state.data(), static_cast<std::streamsize>(state.size()));
  out.close();
  if (!out) {
    throw std::runtime_error("cannot write checkpoint shard " + path.string());
  }
}

int train(const Args& args) {
  // torch's constructor, argument for argument; rank 0 blocks here until
  // every rank has connected.
  tcpstore_barrier::TCPStoreBarrier barrier(
      args.rank,
      args.worldSize,
      args.prefix,
      args.initTimeoutSecs,
      args.useLibUV,
      static_cast<uint16_t>(args.port),
      args.masterAddress,
      args.timeoutSecs);
  std::filesystem::create_directories(args.checkpointDir);

  double totalWait = 0;
  double maxWait = 0;
  for (int64_t step = 0; step < args.iterations; ++step) {
    writeShard(args, step);
    const double entered = wallClockSeconds();
    try {
      barrier.executeBarrier();
    } catch (const tcpstore_barrier::BarrierTimeoutError& e) {
      std::string missing;
      for (int64_t r : e.missingRanks()) {
        missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
      std::fprintf(
          stderr,
          "rank %" PRId64 ": checkpoint barrier of step %" PRId64
          " timed out; missing ranks: [%s]\n%s\n",
          args.rank,
          step,
          missing.c_str(),
          e.what_without_backtrace());
      return 1;
    }
    const double left = wallClockSeconds();
    // Every rank has written step `step`: the previous one is obsolete.
    std::filesystem::remove(shardPath(args, step - 1));
    totalWait += left - entered;
    maxWait = std::max(maxWait, left - entered);
    std::printf(
        "step %" PRId64 " entered %.6f left %.6f\n", step, entered, left);
    std::fflush(stdout);
  }
  // Rank 0 waits here for the others to finish their last round before the
  // store goes away with it.
  barrier.close();
  std::printf(
      "rank %" PRId64 " of %" PRId64 ": %" PRId64
      " checkpoint barriers, mean wait %.3f ms, max %.3f ms, libuv %s\n",
      args.rank,
      args.worldSize,
      args.iterations,
      args.iterations > 0 ? totalWait * 1e3 / args.iterations : 0.0,
      maxWait * 1e3,
      barrier.usesLibUV() ? "yes" : "no");
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parseArgs(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "trainer: %s\n%s", e.what(), kUsage);
    return 2;
  }
  try {
    return train(args);
  } catch (const std::invalid_argument& e) {
    // The barrier checks its arguments before it opens a socket.
    std::fprintf(stderr, "trainer: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const c10::Error& e) {
    // DistStoreError / DistNetworkError: the store is unreachable or gone.
    std::fprintf(
        stderr,
        "rank %" PRId64 ": %s\n",
        args.rank,
        e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %" PRId64 ": %s\n", args.rank, e.what());
    return 1;
  }
}
