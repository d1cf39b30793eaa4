//! Helpers shared by the unit tests: real files in real temp dirs.

use std::path::Path;
use std::sync::Arc;

use crate::{Store, StoreConfig};

pub fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).expect("write test file");
}

/// A temp dir holding `files`, loaded into a Store.
pub fn load(files: &[(&str, &str)], cfg: StoreConfig) -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in files {
        write(dir.path(), name, content);
    }
    let store = Store::load_dir(dir.path(), cfg).expect("load_dir");
    (dir, store)
}

/// `shop/web`: port 80 (`http` -> named targetPort), 9000 (`admin` -> 9990),
/// 9100 (`metrics` -> named port no slice carries).
pub const WEB_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: admin
    port: 9000
    targetPort: 9990
  - name: metrics
    port: 9100
    targetPort: metrics
";

/// An EndpointSlice for `shop/web` with an `http` port of 8080.
pub fn web_slice(name: &str, endpoints: &str) -> String {
    format!(
        "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
{endpoints}"
    )
}

/// One ready endpoint entry for [`web_slice`].
pub fn endpoint(ip: &str, pod: &str) -> String {
    format!(
        "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}, namespace: shop}}\n  zone: zone-a\n"
    )
}

/// The endpoint addresses of a resolution, as strings.
pub fn addrs(resolved: &crate::ResolvedService) -> Vec<String> {
    resolved
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect()
}

/// Counts this thread's heap allocations, so a test can show a hot path allocates nothing.
/// Thread-local, so tests running in parallel don't count each other's.
pub mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    struct Counting;

    fn count() {
        // `try_with`: allocations during thread teardown are not counted (nor panic).
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    }

    // SAFETY: every call is forwarded to the system allocator unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count();
            // SAFETY: the caller upholds `alloc`'s contract, which `System` shares.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count();
            // SAFETY: as above.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count();
            // SAFETY: as above.
            unsafe { System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: as above.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Allocations made on this thread while running `f`.
    pub fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
        let before = ALLOCATIONS.with(Cell::get);
        let out = f();
        (out, ALLOCATIONS.with(Cell::get) - before)
    }
}
