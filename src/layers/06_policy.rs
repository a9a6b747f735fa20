//! Policy: which client may call what, with which CloudCasa credential, how often.
//!
//! Rules are tried in order; the first whose clients, methods and paths all match decides. No
//! match is 403. A rule's rate is a budget per client (each client id matching the rule gets its
//! own), enforced with GCRA (governor); over it, 429 with `Retry-After`. The chosen credential goes
//! into the request as [`SelectedCredential`], which the cache partitions by and token injection
//! uses, so two clients mapped to different tenants never share cached data.

use std::collections::HashMap;

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::Either;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, RateLimiter};
use http::{Method, Request, Response};
use tower::{Layer, Service};

pub use crate::config::policy::{Rate, RuleSpec};
use crate::context::{ClientIdentity, Decision, Exchange, Refusal};
use crate::http::body::Body;
use crate::http::error::GatewayError;
use crate::secrets::credential::SelectedCredential;
use crate::secrets::token::TokenSource;

struct Rule {
    spec: RuleSpec,
    credential: Arc<TokenSource>,
    /// What every request this rule allows records: built once, cloned per request.
    decision: Decision,
    limiter: Option<DefaultKeyedRateLimiter<Arc<str>>>,
}

/// The compiled policy.
pub struct CompiledPolicy {
    rules: Vec<Rule>,
    clock: DefaultClock,
}

impl std::fmt::Debug for CompiledPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.rules.iter().map(|r| &r.spec.name).collect();
        f.debug_struct("CompiledPolicy")
            .field("rules", &names)
            .finish()
    }
}

impl CompiledPolicy {
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

/// Applies the [`CompiledPolicy`] to identified requests.
#[derive(Debug, Clone)]
pub struct PolicyLayer {
    policy: Arc<ArcSwap<CompiledPolicy>>,
}

impl PolicyLayer {
    /// Enforces the policy in force (a reload swaps it).
    pub fn new(policy: Arc<ArcSwap<CompiledPolicy>>) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for PolicyLayer {
    type Service = Policy<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Policy {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// See [`PolicyLayer`].
#[derive(Debug, Clone)]
pub struct Policy<S> {
    inner: S,
    policy: Arc<ArcSwap<CompiledPolicy>>,
}

impl<S, B> Service<Request<B>> for Policy<S>
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
