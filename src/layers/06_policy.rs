//! Policy: which client may call what, with which CloudCasa credential, how often.
//!
//! Rules are tried in order; the first whose clients, methods and paths all match decides. No
//! match is 403. A rule's rate is a budget per client (each client id matching the rule gets its
//! own), enforced with GCRA (governor); over it, 429 with `Retry-After`. The chosen credential goes
//! into the request as [`SelectedCredential`], which the cache partitions by and token injection
//! uses, so two clients mapped to different tenants never share cached data.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{Method, Request, Response};
use tower::{Layer, Service};

use crate::context::Exchange;
use crate::context::{ClientIdentity, Decision, Refusal};
use crate::http::body::Body;
use crate::http::error::GatewayError;
use crate::secrets::credential::SelectedCredential;
use crate::secrets::token::TokenSource;

/// A rate such as `50/s`: `count` requests per `per`, with bursts up to `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests allowed per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// Parses `N/s`, `N/m` or `N/h`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a rate such as \"50/s\", \"600/m\" or \"1000/h\"");
        let (n, unit) = text.split_once('/').ok_or_else(bad)?;
        let count = n.trim().parse::<NonZeroU32>().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        // GCRA admits one request per `per / count`: that interval must be at least a
        // nanosecond, or there is no quota to build (and nothing could be enforced).
        if (per / count.get()).is_zero() {
            return Err(format!(
                "{text:?} is more than one request per nanosecond; the largest rate is \"1000000000/s\""
            ));
        }
        Ok(Self { count, per })
    }

    /// The GCRA quota: one request per `per / count`, bursts up to `count`.
    pub fn quota(self) -> Quota {
        Quota::with_period(self.per / self.count.get())
            .expect("a positive period")
            .allow_burst(self.count)
    }
}

/// One validated `[[policy]]` rule.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    /// `name`, or `policy[N]`.
    pub name: String,
    /// `None`: any client (a `*` glob), matched without running the glob set.
    clients: Option<GlobSet>,
    methods: Option<Vec<Method>>,
    paths: Option<GlobSet>,
    /// The credential requests matching this rule use.
    pub credential: String,
    /// Per-client budget.
    pub rate: Option<Rate>,
}

impl RuleSpec {
    /// Compiles a rule. Client globs: `*` matches any characters. Path globs: `*` matches within
    /// one segment, `**` across segments. Errors name the field.
    pub fn new(
        name: String,
        clients: Vec<String>,
        methods: Option<Vec<String>>,
        paths: Option<Vec<String>>,
        credential: String,
        rate: Option<Rate>,
    ) -> Result<Self, (&'static str, String)> {
        let mut set = GlobSetBuilder::new();
        for c in &clients {
            if let Some(problem) = client_form_problem(c) {
                return Err(("clients", problem));
            }
            let glob = Glob::new(c).map_err(|e| ("clients", format!("{c:?}: {e}")))?;
            set.add(glob);
        }
        // A glob of stars alone matches every id: the rule then needs no glob set at all.
        let any_client = clients
            .iter()
            .any(|c| !c.is_empty() && c.chars().all(|ch| ch == '*'));
        let clients = if any_client {
            None
        } else {
            Some(set.build().map_err(|e| ("clients", e.to_string()))?)
        };
        let methods = match methods {
            None => None,
            Some(list) if list.iter().any(|m| m == "*") => None,
            Some(list) if list.is_empty() => return Err(("methods", "must not be empty".into())),
            Some(list) => Some(
                list.iter()
                    .map(|m| {
                        Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                            .map_err(|_| ("methods", format!("{m:?} is not an HTTP method")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let paths = match paths {
            None => None,
            Some(list) if list.is_empty() => return Err(("paths", "must not be empty".into())),
            Some(list) => {
                let mut set = GlobSetBuilder::new();
                for path in &list {
                    if !path.starts_with('/') {
                        return Err(("paths", format!("{path:?} must start with /")));
                    }
                    let glob = GlobBuilder::new(path)
                        .literal_separator(true)
                        .build()
                        .map_err(|e| ("paths", format!("{path:?}: {e}")))?;
                    set.add(glob);
                }
                Some(set.build().map_err(|e| ("paths", e.to_string()))?)
            }
        };
        Ok(Self {
            name,
            clients,
            methods,
            paths,
            credential,
            rate,
        })
    }

    /// The rule that lets every client do everything with `credential` (no `[[policy]]`).
    pub fn allow_all(credential: &str) -> Self {
        Self::new(
            "default".into(),
            vec!["*".into()],
            None,
            None,
            credential.into(),
            None,
        )
        .expect("a valid rule")
    }

    fn matches(&self, client: &str, method: &Method, path: &str) -> bool {
        self.clients.as_ref().is_none_or(|c| c.is_match(client))
            && self.methods.as_ref().is_none_or(|m| m.contains(method))
            && self.paths.as_ref().is_none_or(|p| p.is_match(path))
    }
}

/// Why a `clients` entry names no identity of any kind: every client id says its kind
/// (`apikey:`, `system:serviceaccount:`, a URI SAN's `scheme://`, `dns:`, `cn:`, or the bare
/// `local` and `anonymous`), so an entry without one could only ever match by accident.
fn client_form_problem(entry: &str) -> Option<String> {
    const PREFIXES: [&str; 4] = ["apikey:", "system:serviceaccount:", "dns:", "cn:"];
    let is_scheme = |s: &str| {
        let mut bytes = s.bytes();
        bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b))
    };
    let uri = entry
        .split_once("://")
        .is_some_and(|(scheme, _)| is_scheme(scheme));
    let stars = !entry.is_empty() && entry.bytes().all(|b| b == b'*');
    if stars
        || uri
        || matches!(entry, "local" | "anonymous")
        || PREFIXES
            .iter()
            .any(|p| entry.starts_with(p) && entry.len() > p.len())
    {
        return None;
    }
    Some(format!(
        "{entry:?} names no kind of client: write \"apikey:<id>\", \
         \"system:serviceaccount:<namespace>:<name>\", a certificate's URI SAN \
         (\"spiffe://…\"), \"dns:<SAN>\", \"cn:<common name>\", \"local\", \"anonymous\" or \"*\"; \
         did you mean \"apikey:{entry}\"?"
    ))
}

struct Rule {
    spec: RuleSpec,
    credential: Arc<TokenSource>,
    /// What every request this rule allows records: built once, cloned per request.
    decision: Decision,
    limiter: Option<DefaultKeyedRateLimiter<Arc<str>>>,
}

/// The compiled policy.
pub struct Policy {
    rules: Vec<Rule>,
    clock: DefaultClock,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.rules.iter().map(|r| &r.spec.name).collect();
        f.debug_struct("Policy").field("rules", &names).finish()
    }
}

impl Policy {
    /// Binds the rules to the credentials' token sources (config validation guarantees each
    /// rule's credential exists).
    pub fn new(specs: Vec<RuleSpec>, credentials: &HashMap<String, Arc<TokenSource>>) -> Self {
        let rules = specs
            .into_iter()
            .map(|spec| Rule {
                credential: credentials[&spec.credential].clone(),
                decision: Decision {
                    rule: spec.name.as_str().into(),
                    credential: spec.credential.as_str().into(),
                },
                limiter: spec.rate.map(|r| RateLimiter::keyed(r.quota())),
                spec,
            })
            .collect();
        Self {
            rules,
            clock: DefaultClock::default(),
        }
    }

    /// Decides for one request.
    fn decide(
        &self,
        client: &ClientIdentity,
        method: &Method,
        path: &str,
    ) -> Result<(&Rule, Decision), (Refusal, GatewayError)> {
        let Some(rule) = self
            .rules
            .iter()
            .find(|r| r.spec.matches(&client.id, method, path))
        else {
            return Err((
                Refusal::Forbidden,
                GatewayError::Forbidden(format!("client '{}' may not {method} {path}", client.id)),
            ));
        };
        if let Some(limiter) = &rule.limiter
            && let Err(not_until) = limiter.check_key(&client.id)
        {
            return Err((
                Refusal::RateLimited,
                GatewayError::RateLimited {
                    retry_after: not_until.wait_time_from(self.clock.now()),
                },
            ));
        }
        Ok((rule, rule.decision.clone()))
    }

    /// Drops idle rate-limit state (called periodically).
    pub fn forget_idle_clients(&self) {
        for limiter in self.rules.iter().filter_map(|r| r.limiter.as_ref()) {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// Applies the [`Policy`] to identified requests.
#[derive(Debug, Clone)]
pub struct PolicyLayer {
    policy: Arc<ArcSwap<Policy>>,
}

impl PolicyLayer {
    /// Enforces the policy in force (a reload swaps it).
    pub fn new(policy: Arc<ArcSwap<Policy>>) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for PolicyLayer {
    type Service = PolicyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PolicyService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// See [`PolicyLayer`].
#[derive(Debug, Clone)]
pub struct PolicyService<S> {
    inner: S,
    policy: Arc<ArcSwap<Policy>>,
}

impl<S, B> Service<Request<B>> for PolicyService<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = GatewayError>,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Either<std::future::Ready<Result<Response<Body>, GatewayError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(client) = req.extensions().get::<Arc<ClientIdentity>>().cloned() else {
            // The identity layer always runs first; without it nothing is allowed.
            return Either::Left(std::future::ready(Err(GatewayError::Internal)));
        };
        let policy = self.policy.load();
        match policy.decide(&client, req.method(), req.uri().path()) {
            Err((refusal, e)) => {
                if let Some(ex) = Exchange::of(&req) {
                    ex.set_refusal(refusal);
                }
                Either::Left(std::future::ready(Err(e)))
            }
            Ok((rule, decision)) => {
                if let Some(ex) = Exchange::of(&req) {
                    ex.set_decision(decision);
                }
                req.extensions_mut()
                    .insert(SelectedCredential(rule.credential.clone()));
                Either::Right(self.inner.call(req))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(clients: &[&str], methods: Option<&[&str]>, paths: Option<&[&str]>) -> RuleSpec {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        RuleSpec::new(
            "r".into(),
            v(clients),
            methods.map(v),
            paths.map(v),
            "c".into(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn globs_for_clients_and_paths() {
        let r = rule(
            &[
                "system:serviceaccount:velero:*",
                "spiffe://cluster.local/ns/ops/sa/bot",
            ],
            Some(&["get", "HEAD"]),
            Some(&["/api/v1/**"]),
        );
        assert!(r.matches(
            "system:serviceaccount:velero:server",
            &Method::GET,
            "/api/v1/clusters"
        ));
        assert!(r.matches(
            "spiffe://cluster.local/ns/ops/sa/bot",
            &Method::HEAD,
            "/api/v1/a/b/c"
        ));
        assert!(!r.matches(
            "system:serviceaccount:other:server",
            &Method::GET,
            "/api/v1/x"
        ));
        assert!(!r.matches(
            "system:serviceaccount:velero:server",
            &Method::POST,
            "/api/v1/x"
        ));
        assert!(!r.matches(
            "system:serviceaccount:velero:server",
            &Method::GET,
            "/other"
        ));

        let one_segment = rule(&["*"], None, Some(&["/api/v1/clusters/*"]));
        let kinds = rule(&["apikey:backup-bot", "cn:backup-*"], None, None);
        assert!(kinds.matches("apikey:backup-bot", &Method::GET, "/"));
        assert!(kinds.matches("cn:backup-bot", &Method::GET, "/"));
        assert!(!kinds.matches("dns:backup-bot", &Method::GET, "/"));
        assert!(one_segment.matches("x", &Method::DELETE, "/api/v1/clusters/abc"));
        assert!(!one_segment.matches("x", &Method::DELETE, "/api/v1/clusters/abc/action"));
    }

    #[test]
    fn bad_rules_name_the_field() {
        let err = RuleSpec::new(
            "r".into(),
            vec!["apikey:a[".into()],
            None,
            None,
            "c".into(),
            None,
        )
        .unwrap_err();
        assert_eq!(err.0, "clients");
        let err = RuleSpec::new(
            "r".into(),
            vec!["apikey:a".into()],
            None,
            Some(vec!["api/**".into()]),
            "c".into(),
            None,
        )
        .unwrap_err();
        assert_eq!(err.0, "paths");
        let err = RuleSpec::new(
            "r".into(),
            vec!["apikey:a".into()],
            Some(vec!["G T".into()]),
            None,
            "c".into(),
            None,
        )
        .unwrap_err();
        assert_eq!(err.0, "methods");
    }

    #[test]
    fn client_entries_must_say_their_kind() {
        for ok in [
            "*",
            "**",
            "local",
            "anonymous",
            "apikey:bot",
            "apikey:*",
            "system:serviceaccount:velero:*",
            "spiffe://cluster.local/ns/ops/sa/*",
            "dns:bot.ops.svc",
            "cn:backup-bot",
        ] {
            assert_eq!(client_form_problem(ok), None, "{ok}");
        }
        for bad in [
            "backup-bot",
            "bot*",
            "apikey:",
            "://x",
            "1x://y",
            "localhost",
            "",
        ] {
            assert!(client_form_problem(bad).is_some(), "{bad}");
        }
        assert!(
            client_form_problem("backup-bot")
                .unwrap()
                .contains("did you mean \"apikey:backup-bot\"?")
        );
    }

    #[test]
    fn rates() {
        assert_eq!(
            Rate::parse("50/s").unwrap(),
            Rate {
                count: NonZeroU32::new(50).unwrap(),
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(Rate::parse("600/m").unwrap().per, Duration::from_secs(60));
        assert!(Rate::parse("1000000000/s").is_ok());
        for bad in ["0/s", "50", "50/d", "x/s", "2000000000/s", "4294967295/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }
}
