//! Who is calling: client identity from mTLS, Kubernetes ServiceAccount tokens, API keys, or the
//! loopback listener (the sidecar case), first match wins.
//!
//! The result is a typed [`ClientIdentity`] in the request extensions (and on the exchange, for
//! audit records and spans). Sidecar mode is the case "loopback listener, no client
//! authentication configured": every caller is `local`. With client authentication configured,
//! unauthenticated callers get 401 (or, with `server.allow_unauthenticated`, are `anonymous`). A bearer credential the client presents
//! is consumed here: it is never forwarded (token injection replaces `Authorization`).

pub mod api_keys;
pub mod kubernetes;

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, header};
use tower::{Layer, Service};

use crate::context::{AuthMethod, ClientIdentity, Exchange, PeerIdentity, Refusal};
use crate::http::body::Body;
use crate::http::error::GatewayError;
use crate::http::gate::{Admit, GateFuture};
use api_keys::ApiKeys;
use kubernetes::TokenReviewer;

/// The identity in a client certificate, in its namespace: its first URI SAN as it is (a SPIFFE
/// ID, `spiffe://…`), else `dns:<first DNS SAN>`, else `cn:<subject CN>`. The prefixes keep
/// identities of different kinds apart: a certificate whose CN is `backup-bot` is `cn:backup-bot`,
/// never the API key `apikey:backup-bot`.
pub fn identity_from_certificate(der: &[u8]) -> Option<ClientIdentity> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let uri = sans.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    });
    let dns = || {
        sans.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(format!("dns:{d}")),
            _ => None,
        })
    };
    let cn = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(|cn| format!("cn:{cn}"))
    };
    let id = uri.or_else(dns).or_else(cn)?;
    Some(ClientIdentity {
        id: id.into(),
        method: AuthMethod::Mtls,
    })
}

/// The configured ways of identifying callers.
#[derive(Debug)]
pub struct Authenticator {
    /// Sidecar mode (a loopback listener and no client authentication configured): every caller
    /// is `local`. Once any client authentication is configured, callers must use it, on
    /// loopback too.
    pub local: bool,
    /// `server.allow_unauthenticated`: unauthenticated callers are `anonymous`.
    pub allow_unauthenticated: bool,
    /// ServiceAccount tokens.
    pub kubernetes: Option<Arc<TokenReviewer>>,
    /// API keys.
    pub api_keys: Option<Arc<ApiKeys>>,
}

/// The sidecar's caller.
static LOCAL: std::sync::LazyLock<Arc<ClientIdentity>> = std::sync::LazyLock::new(|| {
    Arc::new(ClientIdentity {
        id: "local".into(),
        method: AuthMethod::Local,
    })
});

/// An unauthenticated caller where that is allowed.
static ANONYMOUS: std::sync::LazyLock<Arc<ClientIdentity>> = std::sync::LazyLock::new(|| {
    Arc::new(ClientIdentity {
        id: "anonymous".into(),
        method: AuthMethod::Anonymous,
    })
});

enum Identified {
    Known(Arc<ClientIdentity>),
    Review(String),
    Refused(GatewayError),
}

impl Authenticator {
    fn identify<B>(&self, req: &Request<B>) -> Identified {
        if let Some(peer) = req.extensions().get::<PeerIdentity>() {
            return Identified::Known(peer.0.clone());
        }
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty());
        match (bearer, &self.kubernetes, &self.api_keys) {
            (Some(token), Some(_), _) if kubernetes::is_jwt(token) => {
                return Identified::Review(token.to_string());
            }
            (Some(token), _, Some(keys)) => {
                return match keys.identify(token) {
                    Some(id) => Identified::Known(Arc::new(ClientIdentity {
                        id,
                        method: AuthMethod::ApiKey,
                    })),
                    None => Identified::Refused(GatewayError::Unauthenticated(
                        "the bearer credential is not a valid API key or ServiceAccount token"
                            .into(),
                    )),
                };
            }
            (Some(_), Some(_), None) => {
                return Identified::Refused(GatewayError::Unauthenticated(
                    "the bearer credential is not a Kubernetes ServiceAccount token".into(),
                ));
            }
            // No bearer authentication configured: whatever the client sent is just stripped.
            _ => {}
        }
        if self.local {
            Identified::Known(LOCAL.clone())
        } else if self.allow_unauthenticated {
            Identified::Known(ANONYMOUS.clone())
        } else {
            Identified::Refused(GatewayError::Unauthenticated(
                "no client credential: present a client certificate, a ServiceAccount token or \
                 an API key"
                    .into(),
            ))
        }
    }
}

fn admit<B>(req: &mut Request<B>, identity: Arc<ClientIdentity>) {
    if let Some(ex) = Exchange::of(req) {
        ex.set_client(identity.clone());
    }
    req.extensions_mut().insert(identity);
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct IdentityLayer {
    authenticator: Arc<Authenticator>,
}

impl IdentityLayer {
    /// Identifies callers with `authenticator`.
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for IdentityLayer {
    type Service = Identity<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Identity {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Identity<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
}

impl<S, B> Service<Request<B>> for Identity<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = GatewayError> + Clone,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = GateFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let auth = &self.authenticator;
        match auth.identify(&req) {
            Identified::Known(identity) => {
                admit(&mut req, identity);
                GateFuture::call(&mut self.inner, req)
            }
            Identified::Refused(e) => {
                if let Some(ex) = Exchange::of(&req) {
                    ex.set_refusal(Refusal::Unauthenticated);
                }
                GateFuture::refuse(e)
            }
            Identified::Review(token) => {
                let Some(reviewer) = auth.kubernetes.clone() else {
                    return GateFuture::refuse(GatewayError::Internal);
                };
                let exchange = Exchange::of(&req).cloned();
                let step = async move {
                    let (reviewed, review) = reviewer.review(&token).await;
                    if let (Some(ex), Some(review)) = (&exchange, review) {
                        ex.set_review(review);
                    }
                    match reviewed {
                        Ok(identity) => {
                            Ok(Box::new(move |req: &mut Request<B>| admit(req, identity))
                                as Admit<B>)
                        }
                        Err(e) => {
                            if let Some(ex) = &exchange {
                                ex.set_refusal(match &e {
                                    GatewayError::IdentityThrottled { .. } => {
                                        Refusal::IdentityThrottled
                                    }
                                    GatewayError::IdentityUnavailable(_) => {
                                        Refusal::IdentityUnavailable
                                    }
                                    _ => Refusal::Unauthenticated,
                                });
                            }
                            Err(e)
                        }
                    }
                };
                GateFuture::wait(&mut self.inner, req, Box::pin(step))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(params: rcgen::CertificateParams) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn certificate_identity_prefers_uri_then_dns_then_cn() {
        let mut p = rcgen::CertificateParams::new(vec!["bot.ops.svc".into()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/ops/sa/bot".try_into().unwrap(),
        ));
        assert_eq!(
            identity_from_certificate(&cert(p)).unwrap().id.as_ref(),
            "spiffe://cluster.local/ns/ops/sa/bot"
        );
        let p = rcgen::CertificateParams::new(vec!["bot.ops.svc".into()]).unwrap();
        assert_eq!(
            identity_from_certificate(&cert(p)).unwrap().id.as_ref(),
            "dns:bot.ops.svc"
        );
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "backup-bot");
        let id = identity_from_certificate(&cert(p)).unwrap();
        assert_eq!(
            (id.id.as_ref(), id.method),
            ("cn:backup-bot", AuthMethod::Mtls)
        );
    }
}
