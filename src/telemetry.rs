//! The process-wide metrics recorder: installed once, by whichever part
//! starts first (the node, or `magicmx policy` on its own), rendered by the
//! admin listener's `/metrics`. A leaf module: it imports nothing from the
//! crate, so the policy service does not depend on the admin listener.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (tests); then
        // this handle renders nothing, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}
