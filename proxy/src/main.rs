// jemalloc keeps allocations of each size class together, so the buffers an idle connection
// frees when it hibernates leave whole pages free, and its background thread returns them to the
// OS after a second. glibc's malloc left them interleaved with live objects and resident.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at start-up (`_RJEM_MALLOC_CONF` in the environment still wins).
///
/// The last two are for hyper's HTTP/1 read buffers: each connection reads the next request (or
/// response) ahead into a fresh 8 KiB buffer while the last one's head is still in flight, so
/// every request allocates two and frees two, in bursts as wide as the connections in flight.
/// jemalloc's defaults fit one 8 KiB buffer per two-page slab and cache 20 per thread, so with
/// 64 busy connections nearly every one came from (and went back to) the arena, creating and
/// destroying a slab each time: 3,414 of 21,325 instructions per request went to the allocator,
/// against 851 with one connection (`benches/profile.py --concurrency 64`). Slabs of 8 buffers
/// (`slab_sizes`) and at least 64 cached per size class (`tcache_nslots_small_min`; by default
/// twice a slab's count, from 20 to 200) keep the burst in the thread's cache.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,\
slab_sizes:8192-8192:16,tcache_nslots_small_min:64\0";

fn main() -> std::process::ExitCode {
    pylon_proxy::main_with_args(std::env::args_os().collect())
}
