//! `HopLimit`: loop prevention, part two. Proxies that forward to each other (A's outbound
//! sends to B's, which sends back to A's, or an inbound forwarding to another proxy) would pass
//! a request around until something runs out. Every Pylon hop counts itself in the `pylon-hops`
//! request header and refuses a request that has already crossed [`MAX_HOPS`] proxies with 508
//! `pylon-proxy-error: loop detected`. (A proxy connecting to itself is refused before that, in
//! `loops`.)
//!
//! The header goes on to the app too: a request that really is that deep in a mesh, with apps
//! that copy every header onward, is already a loop in all but name.

use http::{HeaderName, HeaderValue, Request};

use super::guard::{GuardLayer, RequestGuard};
use super::ProxyError;

pub const HOPS_HEADER: HeaderName = HeaderName::from_static("pylon-hops");
/// Proxies a request may cross (an outbound and an inbound proxy are two).
pub const MAX_HOPS: usize = 32;

/// `pylon-hops` values as static text: setting the header allocates and counts nothing.
const HOP_VALUES: [&str; MAX_HOPS + 1] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31", "32",
];

/// The hop count a request arrived with (a value that isn't a small number counts as the limit:
/// only proxies write the header).
fn hops_so_far(value: Option<&HeaderValue>) -> usize {
    match value {
        None => 0,
        Some(v) => std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(MAX_HOPS)
            .min(MAX_HOPS),
    }
}

/// Counts this proxy in `pylon-hops`, refusing a request that has crossed too many.
#[derive(Clone, Copy, Debug)]
pub struct HopLimit {
    direction: &'static str,
}

impl HopLimit {
    pub fn layer(direction: &'static str) -> GuardLayer<Self> {
        GuardLayer::new(Self { direction })
    }
}

impl RequestGuard for HopLimit {
    fn check<B>(&self, req: &mut Request<B>) -> Result<(), ProxyError> {
        // One hash and probe of the header's name for both the read and the write (a `get`
        // then an `insert` cost ~150 instructions more per request).
        let entry = req.headers_mut().entry(HOPS_HEADER);
        let hops = match &entry {
            http::header::Entry::Occupied(seen) => hops_so_far(Some(seen.get())),
            http::header::Entry::Vacant(_) => 0,
        };
        if hops >= MAX_HOPS {
            let destination = super::headers::request_authority(req)
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            super::metrics::log_proxy_error(
                self.direction,
                &destination,
                None,
                ProxyError::LoopDetected,
            );
            return Err(ProxyError::LoopDetected);
        }
        let value = HeaderValue::from_static(HOP_VALUES[hops + 1]);
        match entry {
            http::header::Entry::Occupied(mut seen) => {
                seen.insert(value);
            }
            http::header::Entry::Vacant(unseen) => {
                unseen.insert(value);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{ProxyResponse, ResponseBody};
    use tower::{Layer, Service, ServiceExt};

    /// Echoes the hop count it received in the response's `pylon-hops`.
    fn echo() -> impl Service<
        Request<()>,
        Response = ProxyResponse,
        Error = ProxyError,
        Future = std::future::Ready<Result<ProxyResponse, ProxyError>>,
    > + Clone {
        tower::service_fn(|req: Request<()>| {
            let mut rsp = http::Response::new(ResponseBody::empty());
            if let Some(v) = req.headers().get(&HOPS_HEADER) {
                rsp.headers_mut().insert(HOPS_HEADER, v.clone());
            }
            std::future::ready(Ok(rsp))
        })
    }

    async fn through(hops: Option<&str>) -> Result<ProxyResponse, ProxyError> {
        let mut req = Request::new(());
        if let Some(h) = hops {
            req.headers_mut()
                .insert(HOPS_HEADER, HeaderValue::from_str(h).unwrap());
        }
        HopLimit::layer("outbound").layer(echo()).oneshot(req).await
    }

    #[test]
    fn the_values_are_the_counts() {
        for (n, v) in HOP_VALUES.iter().enumerate() {
            assert_eq!(v.parse::<usize>().unwrap(), n);
        }
    }

    #[tokio::test]
    async fn each_proxy_counts_itself() {
        let rsp = through(None).await.unwrap();
        assert_eq!(rsp.headers()[HOPS_HEADER], "1");
        let rsp = through(Some("7")).await.unwrap();
        assert_eq!(rsp.headers()[HOPS_HEADER], "8");
    }

    #[tokio::test]
    async fn a_request_past_the_limit_is_a_loop() {
        let last = (MAX_HOPS - 1).to_string();
        assert!(through(Some(&last)).await.is_ok());
        for past in [MAX_HOPS.to_string().as_str(), "1000", "junk", "-1"] {
            assert_eq!(
                through(Some(past)).await.err(),
                Some(ProxyError::LoopDetected),
                "{past}"
            );
        }
    }

    #[tokio::test]
    async fn a_chain_of_proxies_stops_at_the_limit() {
        // Each hop is another proxy's HopLimit in front of the next.
        let mut hops: Option<String> = None;
        let mut crossed = 0;
        loop {
            match through(hops.as_deref()).await {
                Ok(rsp) => {
                    crossed += 1;
                    hops = Some(rsp.headers()[HOPS_HEADER].to_str().unwrap().to_owned());
                }
                Err(e) => {
                    assert_eq!(e, ProxyError::LoopDetected);
                    break;
                }
            }
            assert!(crossed <= MAX_HOPS, "never stopped");
        }
        assert_eq!(crossed, MAX_HOPS);
    }
}
