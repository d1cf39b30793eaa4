// jemalloc keeps allocations of each size class together, so the buffers an idle connection
// frees when it hibernates leave whole pages free, and its background thread returns them to the
// OS after a second. glibc's malloc left them interleaved with live objects and resident.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at start-up (`_RJEM_MALLOC_CONF` in the environment still wins).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    pylon_proxy::main_with_args(std::env::args_os().collect())
}
