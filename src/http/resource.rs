//! CloudCasa's URL shape: `/api/v1/<collection>/<id>`, for audit records, span names and the
//! cache's invalidation buckets.

use serde::Serialize;

/// `/api/v1/<collection>/<id>`, as named in a request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resource<'a> {
    /// The collection, e.g. `clusters`.
    pub collection: &'a str,
    /// The item id, when the path names one.
    pub id: Option<&'a str>,
}

impl<'a> Resource<'a> {
    /// Parses `/api/v1/<collection>[/<id>[/...]]`; other paths name no resource.
    pub fn parse(path: &'a str) -> Option<Self> {
        let rest = path.strip_prefix("/api/v1/")?;
        let mut parts = rest.split('/');
        let collection = parts.next().filter(|c| !c.is_empty())?;
        let id = parts.next().filter(|i| !i.is_empty());
        Some(Self { collection, id })
    }
}

/// The route template for span names: low-cardinality by construction.
pub fn route(path: &str) -> &'static str {
    match Resource::parse(path) {
        None => "/*",
        Some(Resource { id: None, .. }) => "/api/v1/{collection}",
        Some(_) if path.trim_end_matches('/').matches('/').count() > 4 => {
            "/api/v1/{collection}/{id}/*"
        }
        Some(_) => "/api/v1/{collection}/{id}",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_and_routes() {
        let r = |p| Resource::parse(p);
        assert_eq!(
            r("/api/v1/clusters/abc"),
            Some(Resource {
                collection: "clusters",
                id: Some("abc")
            })
        );
        assert_eq!(
            r("/api/v1/clusters"),
            Some(Resource {
                collection: "clusters",
                id: None
            })
        );
        assert_eq!(r("/api/v1/"), None);
        assert_eq!(r("/healthz"), None);
        assert_eq!(route("/api/v1/clusters"), "/api/v1/{collection}");
        assert_eq!(route("/api/v1/clusters/x"), "/api/v1/{collection}/{id}");
        assert_eq!(
            route("/api/v1/clusters/x/action"),
            "/api/v1/{collection}/{id}/*"
        );
        assert_eq!(route("/other"), "/*");
    }
}
