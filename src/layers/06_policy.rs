//! Policy: which client may call what, with which CloudCasa credential, how often.
//!
//! Rules are tried in order; the first whose clients, methods and paths all match decides. No
//! match is 403. Paths are matched as the upstream routes them, without a trailing slash
//! ([`routed`]): `/api/v1/usergroups/` is the collection to Eve, so it is to policy. A rule's rate is a budget per client (each client id matching the rule gets its
//! own), enforced with GCRA (governor); over it, 429 with `Retry-After`. The chosen credential goes
//! into the request as [`SelectedCredential`], which the cache partitions by and token injection
//! uses, so two clients mapped to different tenants never share cached data.
//!
//! In a fleet (`[fleet]`), a budget is the fleet's: each decision is one GCRA step in Redis, so
//! N replicas admit what one would. When Redis cannot decide (the link is down), each replica
//! admits its share: the budget divided by the replicas alive at the last heartbeat (rounded
//! up), so the fleet as a whole stays near the budget.

use std::collections::HashMap;

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, Either};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, RateLimiter};
use http::{Method, Request, Response};
use tower::{Layer, Service};

pub use crate::config::policy::{Rate, RuleSpec};
use crate::context::{ClientIdentity, Decision, Exchange, Refusal};
use crate::fleet::{Admission, Fleet};
use crate::http::body::Body;
use crate::http::error::GatewayError;
use crate::http::resource::routed;
use crate::secrets::credential::SelectedCredential;
use crate::secrets::token::TokenSource;

struct Rule {
    spec: RuleSpec,
    credential: Arc<TokenSource>,
    /// What every request this rule allows records: built once, cloned per request.
    decision: Decision,
    limiter: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    /// In a fleet whose Redis cannot decide: this replica's share of the budget, for the
    /// replica count it was built for.
    share: Mutex<Option<(u64, DefaultKeyedRateLimiter<Arc<str>>)>>,
}

impl Rule {
    /// This replica's share of the rule's budget among `replicas`.
    fn check_share(&self, client: &Arc<str>, replicas: u64) -> Result<(), std::time::Duration> {
        let Some(rate) = self.spec.rate else {
            return Ok(());
        };
        let mut share = self.share.lock().unwrap_or_else(|e| e.into_inner());
        if share.as_ref().is_none_or(|(n, _)| *n != replicas) {
            let count = u64::from(rate.count.get()).div_ceil(replicas.max(1));
            let count = std::num::NonZeroU32::new(u32::try_from(count).unwrap_or(u32::MAX))
                .unwrap_or(std::num::NonZeroU32::MIN);
            let quota = Rate {
                count,
                per: rate.per,
            }
            .quota();
            *share = Some((replicas, RateLimiter::keyed(quota)));
        }
        let (_, limiter) = share.as_ref().expect("just built");
        limiter
            .check_key(client)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The compiled policy.
pub struct CompiledPolicy {
    rules: Vec<Rule>,
    clock: DefaultClock,
    /// Where budgets are kept when replicas share them.
    fleet: Option<Arc<Fleet>>,
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
    pub fn new(
        specs: Vec<RuleSpec>,
        credentials: &HashMap<String, Arc<TokenSource>>,
        fleet: Option<Arc<Fleet>>,
    ) -> Self {
        let rules = specs
            .into_iter()
            .map(|spec| Rule {
                credential: credentials[&spec.credential].clone(),
                decision: Decision {
                    rule: spec.name.as_str().into(),
                    credential: spec.credential.as_str().into(),
                },
                limiter: spec.rate.map(|r| RateLimiter::keyed(r.quota())),
                share: Mutex::new(None),
                spec,
            })
            .collect();
        Self {
            rules,
            clock: DefaultClock::default(),
            fleet,
        }
    }

    /// Decides for one request, on its path as the upstream routes it ([`routed`]).
    fn decide(
        &self,
        client: &ClientIdentity,
        method: &Method,
        path: &str,
    ) -> Result<usize, (Refusal, GatewayError)> {
        let Some(index) = self
            .rules
            .iter()
            .position(|r| r.spec.matches(&client.id, method, routed(path)))
        else {
            return Err((
                Refusal::Forbidden,
                GatewayError::Forbidden(format!("client '{}' may not {method} {path}", client.id)),
            ));
        };
        let rule = &self.rules[index];
        if self.fleet.is_none()
            && let Some(limiter) = &rule.limiter
            && let Err(not_until) = limiter.check_key(&client.id)
        {
            return Err((
                Refusal::RateLimited,
                GatewayError::RateLimited {
                    retry_after: not_until.wait_time_from(self.clock.now()),
                },
            ));
        }
        Ok(index)
    }

    /// Drops idle rate-limit state (called periodically).
    pub fn forget_idle_clients(&self) {
        for limiter in self.rules.iter().filter_map(|r| r.limiter.as_ref()) {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        for rule in &self.rules {
            if let Some((_, limiter)) = &*rule.share.lock().unwrap_or_else(|e| e.into_inner()) {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
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

/// The policy's answer: refused at once, passed on, or (a fleet-wide budget) passed on after
/// Redis decided.
type PolicyFuture<F> = Either<
    std::future::Ready<Result<Response<Body>, GatewayError>>,
    Either<F, BoxFuture<'static, Result<Response<Body>, GatewayError>>>,
>;

impl<S, B> Service<Request<B>> for Policy<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = PolicyFuture<S::Future>;

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
            Ok(index) => {
                let rule = &policy.rules[index];
                if let Some(ex) = Exchange::of(&req) {
                    ex.set_decision(rule.decision.clone());
                }
                req.extensions_mut()
                    .insert(SelectedCredential(rule.credential.clone()));
                let (Some(fleet), Some(rate)) = (&policy.fleet, rule.spec.rate) else {
                    return Either::Right(Either::Left(self.inner.call(req)));
                };
                // A fleet-wide budget: Redis decides, then the request goes on.
                let fleet = fleet.clone();
                let policy = Arc::clone(&policy);
                let inner = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, inner);
                Either::Right(Either::Right(Box::pin(async move {
                    let rule = &policy.rules[index];
                    let refused = match fleet
                        .admit(&rule.spec.name, &client.id, rate.count.get(), rate.per)
                        .await
                    {
                        Admission::Admitted => None,
                        Admission::Refused(wait) => Some(wait),
                        Admission::Unknown => rule.check_share(&client.id, fleet.replicas()).err(),
                    };
                    if let Some(retry_after) = refused {
                        if let Some(ex) = Exchange::of(&req) {
                            ex.set_refusal(Refusal::RateLimited);
                        }
                        return Err(GatewayError::RateLimited { retry_after });
                    }
                    inner.call(req).await
                })))
            }
        }
    }
}
