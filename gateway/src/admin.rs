//! The admin endpoint, served by [`federation::admin`]: `/ready`, `/metrics` (Prometheus text),
//! `/links` (JSON).

use std::sync::Arc;

use federation::admin::{Endpoints, Limits, Reply};
use tokio::net::TcpListener;

use crate::Shared;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    federation::admin::serve(
        listener,
        Arc::new(Admin(shared)),
        Limits::default(),
        std::future::pending(),
    )
    .await;
}

struct Admin(Arc<Shared>);

impl Endpoints for Admin {
    const DUMPS: &'static [&'static str] = &["/links"];

    fn ready(&self) -> Result<(), String> {
        self.0.readiness()
    }

    fn metrics(&self) -> String {
        self.0.metrics.render(self.0.own.as_str(), &self.0.links())
    }

    fn dump(&self, path: &str, _query: &str) -> Option<Reply> {
        (path == "/links").then(|| {
            Reply::json(
                serde_json::to_string_pretty(&self.0.links()).unwrap_or_else(|_| "[]".into()),
            )
        })
    }
}
