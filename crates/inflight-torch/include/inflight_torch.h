/*
 * inflight_torch.h: the C ABI of libinflight_torch.so, PyTorch's pluggable
 * CUDA allocator over inflight's stream-ordered queues.
 *
 * Build: cargo build --release -p inflight-torch
 *        -> target/release/libinflight_torch.so
 * Use from PyTorch: the Python package in python/ (inflight_torch.enable()).
 *
 * Every function may be called from any thread, concurrently with every
 * other. None ever unwinds or aborts: bad calls print one line on stderr,
 * prefixed "inflight_torch:", and return null, an error code, or nothing.
 * The Rust documentation (crates/inflight-torch/src/lib.rs) and
 * docs/TORCH.md give each contract in full; this header repeats it briefly,
 * in the order arguments, return, ownership, thread safety.
 */
#ifndef INFLIGHT_TORCH_H
#define INFLIGHT_TORCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h> /* ssize_t */

#ifdef __cplusplus
extern "C" {
#endif

#define INFLIGHT_TORCH_OK 0         /* success */
#define INFLIGHT_TORCH_EINVAL (-1)  /* an argument is invalid (reported) */
#define INFLIGHT_TORCH_ESTARTED (-2) /* configure after the first allocation */
#define INFLIGHT_TORCH_EINTERNAL (-3) /* a panic was caught inside (reported) */
#define INFLIGHT_TORCH_ABI_VERSION 1

/* cudaStream_t, without needing CUDA's headers. */
typedef struct CUstream_st *inflight_torch_stream_t;

/* One device's statistics. Fields are only ever added at the end. */
typedef struct inflight_torch_stats {
    uint64_t allocated_bytes;       /* live bytes (allocated_bytes.all.current) */
    uint64_t peak_allocated_bytes;  /* since the start or the last peak reset */
    uint64_t reserved_bytes;        /* held from the device: live + cached */
    uint64_t peak_reserved_bytes;
    uint64_t cached_ready_bytes;    /* cached, reusable now */
    uint64_t cached_pending_bytes;  /* cached, last use still in flight */
    uint64_t active_count;          /* live allocations */
    uint64_t allocations;
    uint64_t frees;
    uint64_t cache_hits;
    uint64_t device_allocations;    /* num_device_alloc */
    uint64_t device_releases;       /* num_device_free */
    uint64_t device_alloc_failures; /* num_alloc_retries */
    uint64_t oom_errors;            /* num_ooms */
    uint64_t deferred_frees;
    uint64_t waits;
    uint64_t streams;               /* streams adopted */
} inflight_torch_stats;

/* The ABI version (INFLIGHT_TORCH_ABI_VERSION). */
uint32_t inflight_torch_abi_version(void);

/*
 * PyTorch's alloc function.
 * Arguments: size in bytes (0: null, silently; negative: null, reported);
 *   device ordinal; the stream the memory is used on until its free (0:
 *   the legacy default stream; on the simulated GPU any integer).
 * Returns: the device address, or null (size 0, device out of range or
 *   unavailable, a stream that cannot be adopted, out of memory: each but
 *   the first reported on stderr).
 * Ownership: the caller owns the allocation until inflight_torch_free.
 * Thread safety: any thread. The stream must stay valid while its
 *   allocations, or uses declared on it, may be in use.
 */
void *inflight_torch_malloc(ssize_t size, int device, inflight_torch_stream_t stream);

/*
 * PyTorch's free function; the free is stream-ordered.
 * Arguments: an address inflight_torch_malloc returned (null: ignored);
 *   its size; its device; its stream (unused: the allocation knows it).
 * Returns: nothing; an unknown pointer, a double free, a pointer inside an
 *   allocation, a device out of range: reported, nothing done.
 * Ownership: the allocation goes back to the library.
 * Thread safety: any thread, the allocating one or another.
 */
void inflight_torch_free(void *ptr, ssize_t size, int device, inflight_torch_stream_t stream);

/*
 * The record-stream hook (set_record_stream_fn): declares a use of a live
 * allocation on another stream of its device; at its free, the memory is
 * kept from other streams and from the device until that stream's work up
 * to the free has completed.
 * Returns: nothing; an unknown pointer is reported and ignored.
 * Ownership: nothing changes hands.  Thread safety: any thread.
 */
void inflight_torch_record_stream(void *ptr, inflight_torch_stream_t stream);

/*
 * The reset hook (set_reset_fn), torch.cuda.empty_cache(): every device's
 * ready blocks go back to the device now, pending ones once their work is
 * done. Thread safety: any thread.
 */
void inflight_torch_empty_cache(void);

/* The init hook (set_init_fn): the device count PyTorch sees. */
void inflight_torch_init(int device_count);

/*
 * The memory-fraction hook (set_memory_fraction_fn): the device's memory
 * limit becomes fraction x its capacity (clamped to 1 byte .. capacity).
 * Before the device's first allocation it is kept and applied then.
 */
void inflight_torch_set_memory_fraction(double fraction, int device);

/*
 * Configures the allocators, before the first allocation.
 * Arguments: policy "deferred" (default), "retained" or "immediate" (the
 *   defect, for demonstrations: it corrupts results), null = unchanged;
 *   cache_limit and memory_limit in bytes per device, negative = default;
 *   backend "cuda" or "sim", null = $INFLIGHT_TORCH_BACKEND, else cuda.
 * Returns: INFLIGHT_TORCH_OK, INFLIGHT_TORCH_EINVAL (nothing changed),
 *   INFLIGHT_TORCH_ESTARTED (after the first allocation: nothing changed).
 * Ownership: the strings are read during the call only.
 * Thread safety: any thread.
 */
int inflight_torch_configure(const char *policy, int64_t cache_limit, int64_t memory_limit,
                             const char *backend);

/*
 * Fills *out (at most out_size bytes) with device's statistics.
 * Returns: INFLIGHT_TORCH_OK (zeros for a device not used yet),
 *   INFLIGHT_TORCH_EINVAL (null out, device out of range).
 * Ownership: the caller owns out.  Thread safety: any thread.
 */
int inflight_torch_stats(int device, inflight_torch_stats *out, size_t out_size);

/* Resets the peak figures to the current ones; device < 0: every device. */
void inflight_torch_reset_peak(int device);

/* "cuda", "sim", "unavailable", or "none" before the first allocation; static. */
const char *inflight_torch_backend(void);

/* Devices counted at the first allocation (0 before it). */
int inflight_torch_device_count(void);

/* Live allocations on device (leak checks, tests). */
size_t inflight_torch_live_allocations(int device);

/* Tests: the next call of the named entry point panics inside (and is caught). */
int inflight_torch_debug_arm_panic(const char *entry);

#ifdef __cplusplus
}
#endif

#endif /* INFLIGHT_TORCH_H */
