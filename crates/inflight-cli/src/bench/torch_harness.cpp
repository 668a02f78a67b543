// inflight bench: PyTorch's CUDACachingAllocator over the same operation
// sequences as the Rust rows. Written out and compiled by `inflight bench` at
// run time (see src/bench/torch.rs); prints JSON lines on stdout.
//
// argv: pairs batches seed live steps min max size...
//
// The mixed sequence is generated here with the same xorshift64* generator,
// log-uniform mapping and checksum as src/bench.rs; the first line carries the
// checksum so the caller can check that both sides generated the same sizes.

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <vector>

namespace alloc = c10::cuda::CUDACachingAllocator;

namespace {

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed ^ 0x9E3779B97F4A7C15ULL) {
    if (s == 0) s = 1;
  }
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1DULL;
  }
  uint64_t log_uniform(uint64_t lo, uint64_t hi) {
    double u = static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0);
    double a = std::log2(static_cast<double>(lo));
    double b = std::log2(static_cast<double>(hi));
    double v = std::exp2(a + u * (b - a));
    uint64_t x = static_cast<uint64_t>(v);
    return std::min(std::max(x, lo), hi);
  }
};

struct Fnv {
  uint64_t h = 0xcbf29ce484222325ULL;
  void add(uint64_t w) {
    h ^= w;
    h *= 0x100000001b3ULL;
  }
};

double now_ns() {
  return std::chrono::duration<double, std::nano>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// As src/bench.rs: at least one untimed batch, and until 250 ms have passed
// (at most 100).
template <class F>
void warm_up(F batch) {
  double t = now_ns();
  for (int n = 0; n < 100; ++n) {
    batch();
    if (now_ns() - t >= 250e6) return;
  }
}

void begin_sequence() {
  alloc::emptyCache();
  alloc::resetPeakStats(0);
  alloc::resetAccumulatedStats(0);
}

void print_row(const char* name, uint64_t bytes, uint64_t ops,
               const std::vector<double>& ns) {
  auto st = alloc::getDeviceStats(0);
  std::printf(
      "{\"sequence\":\"%s\",\"bytes\":%" PRIu64 ",\"ops\":%" PRIu64
      ",\"device_allocations\":%lld,\"peak_reserved_bytes\":%lld,"
      "\"peak_live_bytes\":%lld,\"peak_requested_bytes\":%lld,\"ns\":[",
      name, bytes, ops, static_cast<long long>(st.segment[0].allocated),
      static_cast<long long>(st.reserved_bytes[0].peak),
      static_cast<long long>(st.allocated_bytes[0].peak),
      static_cast<long long>(st.requested_bytes[0].peak));
  for (size_t i = 0; i < ns.size(); ++i) {
    std::printf(i ? ",%.3f" : "%.3f", ns[i]);
  }
  std::printf("]}\n");
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 9) {
    std::fprintf(stderr, "usage: %s pairs batches seed live steps min max size...\n", argv[0]);
    return 2;
  }
  const uint64_t pairs = std::strtoull(argv[1], nullptr, 10);
  const int batches = std::atoi(argv[2]);
  const uint64_t seed = std::strtoull(argv[3], nullptr, 10);
  const uint64_t live_n = std::strtoull(argv[4], nullptr, 10);
  const uint64_t steps = std::strtoull(argv[5], nullptr, 10);
  const uint64_t lo = std::strtoull(argv[6], nullptr, 10);
  const uint64_t hi = std::strtoull(argv[7], nullptr, 10);
  std::vector<uint64_t> sizes;
  for (int i = 8; i < argc; ++i) sizes.push_back(std::strtoull(argv[i], nullptr, 10));

  // The mixed sequence, exactly as src/bench.rs generates it.
  Rng rng(seed);
  Fnv sum;
  std::vector<uint64_t> initial(live_n);
  for (auto& s : initial) {
    s = rng.log_uniform(lo, hi);
    sum.add(s);
  }
  std::vector<uint64_t> slot(steps), size(steps);
  for (uint64_t i = 0; i < steps; ++i) {
    slot[i] = rng.next() % live_n;
    size[i] = rng.log_uniform(lo, hi);
    sum.add(slot[i]);
    sum.add(size[i]);
  }

  // init first (what torch.cuda does on first use), then the current stream.
  alloc::init(c10::cuda::device_count());
  c10::cuda::set_device(0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(0).stream();
  std::printf("{\"checksum\":\"%016" PRIx64 "\",\"devices\":%d}\n", sum.h,
              static_cast<int>(c10::cuda::device_count()));
  std::fflush(stdout);

  // Cache-hit pairs.
  for (uint64_t bytes : sizes) {
    begin_sequence();
    auto batch = [&](uint64_t n) {
      double t = now_ns();
      for (uint64_t i = 0; i < n; ++i) {
        void* p = alloc::raw_alloc_with_stream(bytes, stream);
        alloc::raw_delete(p);
      }
      return (now_ns() - t) / static_cast<double>(n);
    };
    warm_up([&] { batch(pairs); });
    std::vector<double> ns;
    for (int b = 0; b < batches; ++b) ns.push_back(batch(pairs));
    char name[64];
    std::snprintf(name, sizeof name, "pair-%" PRIu64, bytes);
    print_row(name, bytes, pairs, ns);
  }

  // The mixed workload: replace one live buffer a step.
  begin_sequence();
  std::vector<void*> live(live_n);
  for (uint64_t i = 0; i < live_n; ++i) live[i] = alloc::raw_alloc_with_stream(initial[i], stream);
  auto pass = [&]() {
    double t = now_ns();
    for (uint64_t i = 0; i < steps; ++i) {
      alloc::raw_delete(live[slot[i]]);
      live[slot[i]] = alloc::raw_alloc_with_stream(size[i], stream);
    }
    return (now_ns() - t) / static_cast<double>(steps);
  };
  warm_up(pass);
  std::vector<double> ns;
  for (int b = 0; b < batches; ++b) ns.push_back(pass());
  for (void* p : live) alloc::raw_delete(p);
  print_row("mixed", 0, steps, ns);
  alloc::emptyCache();
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "pytorch harness: %s\n", e.what());
  return 1;
}
