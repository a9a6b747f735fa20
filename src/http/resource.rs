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

/// The path as Eve routes it: without its trailing slash (the root excepted). Werkzeug's rules
/// answer `/api/v1/usergroups/` as the collection and `/api/v1/usergroups/ID/` as the item, so
/// a decision on the path (policy's globs) is made on this form, or a rule written for items
/// (`/api/v1/usergroups/*`) would let `DELETE /api/v1/usergroups/` empty the collection.
pub fn routed(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(routed) if !routed.is_empty() => routed,
        _ => path,
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
    fn a_path_is_routed_without_its_trailing_slash() {
        assert_eq!(routed("/api/v1/usergroups/"), "/api/v1/usergroups");
        assert_eq!(routed("/api/v1/usergroups/x/"), "/api/v1/usergroups/x");
        assert_eq!(routed("/api/v1/usergroups"), "/api/v1/usergroups");
        assert_eq!(routed("/"), "/");
    }

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
