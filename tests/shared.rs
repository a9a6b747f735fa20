//! The shared egress gateway: TLS and mTLS, Kubernetes TokenReview, API keys, per-client policy
//! and credentials, rate limits, and the identity in audit records and metrics.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use cloudcasa_gateway::layers::identity::api_keys::key_line;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use support::kube::{FakeKube, GATEWAY_SA_TOKEN, sa_token};
use support::tls::{ClientCert, TestCa, https_client};
use support::*;

const BOT_KEY: &str = "bot-key-0123456789abcdef";
const SPIFFE_OPS: &str = "spiffe://cluster.local/ns/ops/sa/backup-bot";

/// Everything a shared gateway needs on disk.
struct Fixture {
    dir: tempfile::TempDir,
    server_ca: TestCa,
    client_ca: TestCa,
    kube: FakeKube,
    mock: MockCloudCasa,
    tenant_a: SecretDir,
    _tenant_b: SecretDir,
    gw: TestGateway,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.gw.proxy.port())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        cert: Option<ClientCert<'_>>,
    ) -> Result<Reply, String> {
        let identity = cert.map(|c| self.client_ca.client(c));
        let client = https_client(&self.server_ca.pem(), identity);
        let mut req = Request::builder().method(method).uri(self.url(path));
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let resp = client
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        })
    }

    async fn get(&self, path: &str, bearer: Option<&str>) -> Reply {
        self.send(Method::GET, path, bearer, None).await.unwrap()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    write_file(dir, name, text).display().to_string()
}

const POLICY: &str = r#"
[[policy]]
name = "velero-read"
clients = ["system:serviceaccount:velero:*"]
methods = ["GET"]
paths = ["/api/v1/**"]
credential = "team-a"

[[policy]]
name = "ops-mtls"
clients = ["spiffe://cluster.local/ns/ops/sa/*"]
credential = "team-a"

[[policy]]
name = "bot"
clients = ["apikey:backup-bot"]
paths = ["/api/v1/clusters", "/api/v1/clusters/*"]
credential = "team-b"
rate = "3/m"
"#;

async fn fixture(extra: &str) -> Fixture {
    fixture_with(extra, "").await
}

/// As [`fixture`], with `kubernetes` lines added to `[clients.kubernetes]`.
async fn fixture_with(extra: &str, kubernetes: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = TestCa::new("gateway server CA");
    let client_ca = TestCa::new("gateway client CA");
    let (cert, key) = server_ca.leaf_pem(&["127.0.0.1"]);
    let kube = FakeKube::start().await;
    let mock = MockCloudCasa::start().await;
    mock.state
        .seed("a", "clusters", json!({"name": "tenant-a-cluster"}));
    mock.state
        .seed("b", "clusters", json!({"name": "tenant-b-cluster"}));
    let tenant_a = SecretDir::new("token-a");
    let tenant_b = SecretDir::new("token-b");
    let toml = format!(
        r#"
[server.tls]
cert_file = "{cert}"
key_file = "{key}"
client_ca_file = "{client_ca}"

[upstream]
url = "{upstream}"

[[credentials]]
name = "team-a"
file = "{a}"

[[credentials]]
name = "team-b"
file = "{b}"

[clients.kubernetes]
api_server = "{kube}"
token_file = "{sa}"
ca_file = "{kube_ca}"
{kubernetes}

[clients.api_keys]
file = "{keys}"
{POLICY}
{extra}
"#,
        cert = write(d, "tls.crt", &cert),
        key = write(d, "tls.key", &key),
        client_ca = write(d, "client-ca.crt", &client_ca.pem()),
        upstream = mock.url(),
        a = tenant_a.token_path().display(),
        b = tenant_b.token_path().display(),
        kube = kube.url(),
        sa = write(d, "sa-token", GATEWAY_SA_TOKEN),
        kube_ca = write(d, "kube-ca.crt", &kube.ca_pem),
        keys = write(
            d,
            "api-keys.toml",
            &(key_line("backup-bot", BOT_KEY) + "\n")
        ),
    );
    let gw = TestGateway::start(&toml).await;
    Fixture {
        dir,
        server_ca,
        client_ca,
        kube,
        mock,
        tenant_a,
        _tenant_b: tenant_b,
        gw,
    }
}

fn names(reply: &Reply) -> Vec<String> {
    reply.json()["_items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a collection: {}", reply.text()))
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn service_account_tokens_are_reviewed_with_the_audience() {
    let f = fixture("").await;
    let velero = sa_token("velero");
    let other_audience = sa_token("velero-other");
    let other_ns = sa_token("default");
    f.kube
        .add(&velero, "velero", "server", &["cloudcasa-gateway"]);
    f.kube.add(
        &other_audience,
        "velero",
        "server",
        &["https://kubernetes.default.svc"],
    );
    f.kube
        .add(&other_ns, "default", "builder", &["cloudcasa-gateway"]);

    let ok = f.get("/api/v1/clusters", Some(&velero)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(names(&ok), ["tenant-a-cluster"]);
    // The client's token went nowhere upstream: the credential's did.
    assert_eq!(
        f.mock.state.last().header("authorization"),
        Some("Bearer token-a")
    );
    // Reviews are cached.
    let reviews = f.kube.reviews();
    f.get("/api/v1/clusters", Some(&velero)).await;
    assert_eq!(f.kube.reviews(), reviews);

    let wrong_audience = f.get("/api/v1/clusters", Some(&other_audience)).await;
    assert!(wrong_audience.envelope_message(401).contains("rejected"));
    assert_eq!(
        wrong_audience.header("www-authenticate"),
        Some("Bearer realm=\"cloudcasa-gateway\"")
    );
    let unknown = f.get("/api/v1/clusters", Some(&sa_token("nobody"))).await;
    unknown.envelope_message(401);
    // Authenticated, but no rule for its namespace.
    let denied = f.get("/api/v1/clusters", Some(&other_ns)).await;
    let message = denied.envelope_message(403);
    assert!(
        message.contains("system:serviceaccount:default:builder"),
        "{message}"
    );
    // Allowed client, disallowed method and path.
    let delete = f
        .send(Method::DELETE, "/api/v1/clusters/x", Some(&velero), None)
        .await
        .unwrap();
    delete.envelope_message(403);
    f.get("/version", Some(&velero)).await.envelope_message(403);

    let records = f.gw.wait_audit(7).await;
    let first = &records[0];
    assert_eq!(first["client"]["id"], "system:serviceaccount:velero:server");
    assert_eq!(first["client"]["auth"], "kubernetes");
    assert_eq!(first["rule"], "velero-read");
    assert_eq!(first["credential"], "team-a");
    let refused = records.iter().find(|r| r["status"] == 401).unwrap();
    assert_eq!(refused["client"]["id"], serde_json::Value::Null);
    assert_eq!(refused["error"], "unauthenticated");
    let forbidden = records.iter().find(|r| r["status"] == 403).unwrap();
    assert_eq!(
        forbidden["client"]["id"],
        "system:serviceaccount:default:builder"
    );
    assert_eq!(forbidden["rule"], serde_json::Value::Null);
    let audit = std::fs::read_to_string(f.gw.audit.as_ref().unwrap()).unwrap();
    for secret in [velero.as_str(), "token-a", "token-b", GATEWAY_SA_TOKEN] {
        assert!(!audit.contains(secret), "a credential in the audit trail");
    }
}

#[tokio::test]
async fn an_unreachable_api_server_means_503_never_access() {
    let f = fixture("").await;
    // A second gateway whose API server address has nothing listening.
    let dead = format!("https://127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let gw = TestGateway::start(&format!(
        r#"
[upstream]
url = "{}"
[token]
file = "{}"
[clients.kubernetes]
api_server = "{dead}"
token_file = "{}"
ca_file = "{}"
timeout = "2s"
"#,
        f.mock.url(),
        f.tenant_a.token_path().display(),
        f.path("sa-token").display(),
        f.path("kube-ca.crt").display(),
    ))
    .await;
    let reply = get(
        &gw.url("/api/v1/clusters"),
        &[("authorization", &format!("Bearer {}", sa_token("velero")))],
    )
    .await;
    let message = reply.envelope_message(503);
    assert!(message.contains("TokenReview"), "{message}");
    let before = f.mock.state.count();
    assert_eq!(before, 0, "nothing reached the upstream");
    // Without any credential: 401, not local access, although the listener is loopback.
    get(&gw.url("/api/v1/clusters"), &[])
        .await
        .envelope_message(401);
}

#[tokio::test]
async fn client_certificates_identify_clients() {
    let f = fixture("").await;
    let valid = ClientCert {
        uri: Some(SPIFFE_OPS),
        dns: Some("backup-bot.ops.svc"),
        ..Default::default()
    };
    let ok = f
        .send(Method::GET, "/api/v1/clusters", None, Some(valid))
        .await
        .unwrap();
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(names(&ok), ["tenant-a-cluster"]);

    // No certificate, no other credential: 401.
    f.get("/api/v1/clusters", None).await.envelope_message(401);

    // A certificate from another CA, or an expired one: the handshake fails.
    let stranger = TestCa::new("someone else");
    let client = https_client(
        &f.server_ca.pem(),
        Some(stranger.client(ClientCert {
            uri: Some(SPIFFE_OPS),
            ..Default::default()
        })),
    );
    let req = Request::get(f.url("/api/v1/clusters"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(
        client.request(req).await.is_err(),
        "another CA's certificate was accepted"
    );
    let expired = f
        .send(
            Method::GET,
            "/api/v1/clusters",
            None,
            Some(ClientCert {
                uri: Some(SPIFFE_OPS),
                expired: true,
                ..Default::default()
            }),
        )
        .await;
    assert!(
        expired.is_err(),
        "an expired certificate was accepted: {expired:?}"
    );

    // DNS SAN, then CN, when there is no URI SAN; such ids match no rule here.
    let by_cn = f
        .send(
            Method::GET,
            "/api/v1/clusters",
            None,
            Some(ClientCert {
                cn: Some("just-a-cn"),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    assert!(by_cn.envelope_message(403).contains("just-a-cn"));

    let records = f.gw.wait_audit(3).await;
    assert_eq!(records[0]["client"]["id"], SPIFFE_OPS);
    assert_eq!(records[0]["client"]["auth"], "mtls");
    assert_eq!(records[0]["rule"], "ops-mtls");
}

#[tokio::test]
async fn api_keys_map_to_their_own_tenant_and_rate() {
    let f = fixture("").await;
    let velero = sa_token("velero");
    f.kube
        .add(&velero, "velero", "server", &["cloudcasa-gateway"]);

    // Same URL, two clients, two credentials: each sees its own tenant (the cache is partitioned).
    let a = f.get("/api/v1/clusters", Some(&velero)).await;
    let b = f.get("/api/v1/clusters", Some(BOT_KEY)).await;
    assert_eq!(names(&a), ["tenant-a-cluster"]);
    assert_eq!(names(&b), ["tenant-b-cluster"], "{}", b.text());
    assert_eq!(
        f.mock.state.last().header("authorization"),
        Some("Bearer token-b")
    );

    f.get("/api/v1/clusters", Some("not-a-key"))
        .await
        .envelope_message(401);
    // Outside the bot's paths.
    f.get("/api/v1/users", Some(BOT_KEY))
        .await
        .envelope_message(403);

    // 3 per minute: the first request above and two more, then 429.
    for _ in 0..2 {
        assert_eq!(
            f.get("/api/v1/clusters", Some(BOT_KEY)).await.status,
            StatusCode::OK
        );
    }
    let limited = f.get("/api/v1/clusters", Some(BOT_KEY)).await;
    limited.envelope_message(429);
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    // Other clients have their own budget.
    assert_eq!(
        f.get("/api/v1/clusters", Some(&velero)).await.status,
        StatusCode::OK
    );

    let records = f.gw.wait_audit(8).await;
    let bot = records
        .iter()
        .find(|r| r["client"]["id"] == "apikey:backup-bot")
        .unwrap();
    assert_eq!(bot["client"]["auth"], "api_key");
    assert_eq!(bot["rule"], "bot");
    assert_eq!(bot["credential"], "team-b");
    let limited_record = records.iter().find(|r| r["status"] == 429).unwrap();
    assert_eq!(limited_record["error"], "rate_limited");
    assert_eq!(limited_record["client"]["id"], "apikey:backup-bot");

    let metrics = get(&f.gw.admin_url("/metrics"), &[]).await.text();
    for line in [
        "cloudcasa_gateway_client_denials_total{client=\"apikey:backup-bot\",reason=\"rate_limited\"} 1",
        "cloudcasa_gateway_client_denials_total{client=\"apikey:backup-bot\",reason=\"forbidden\"} 1",
        "cloudcasa_gateway_client_denials_total{client=\"\",reason=\"unauthenticated\"} 1",
        "cloudcasa_gateway_client_requests_total{client=\"apikey:backup-bot\",status_class=\"2xx\"} 3",
        "cloudcasa_gateway_token_loaded{credential=\"team-b\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

#[tokio::test]
async fn rotated_keys_file_and_certificate_are_picked_up() {
    let f = fixture("").await;
    assert_eq!(
        f.get("/api/v1/clusters", Some(BOT_KEY)).await.status,
        StatusCode::OK
    );
    // Rotate the key: the old one stops working, the new one works.
    let new_key = "bot-key-rotated-fedcba9876543210";
    write(
        f.dir.path(),
        "api-keys.toml.tmp",
        &(key_line("backup-bot", new_key) + "\n"),
    );
    std::fs::rename(f.path("api-keys.toml.tmp"), f.path("api-keys.toml")).unwrap();
    eventually(Duration::from_secs(10), "the rotated key", || async {
        f.get("/api/v1/clusters", Some(new_key)).await.status == StatusCode::OK
    })
    .await;
    f.get("/api/v1/clusters", Some(BOT_KEY))
        .await
        .envelope_message(401);

    // cert-manager renews the serving certificate from another CA: new connections get it.
    let next_ca = TestCa::new("next server CA");
    let (cert, key) = next_ca.leaf_pem(&["127.0.0.1"]);
    write(f.dir.path(), "tls.key", &key);
    write(f.dir.path(), "tls.crt", &cert);
    eventually(
        Duration::from_secs(10),
        "the renewed certificate",
        || async {
            let client = https_client(&next_ca.pem(), None);
            let req = Request::get(f.url("/api/v1/clusters"))
                .header("authorization", format!("Bearer {new_key}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            matches!(client.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        },
    )
    .await;
}

/// A TLS connection to the gateway offering `alpn`, trusting its server CA, with a client
/// certificate from `ca` when `cert` is given.
async fn tls_connect(
    f: &Fixture,
    alpn: &[u8],
    ca: &TestCa,
    cert: Option<ClientCert<'_>>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(f.server_ca.pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match cert {
        Some(cert) => {
            let (chain, key) = ca.client(cert);
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(f.gw.proxy).await?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
}

/// Reads until the gateway closes the connection (a TLS stream cut without close_notify is
/// closed too); how long that took, or `None` if it was still open after `limit`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut ignored = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut ignored))
        .await
        .ok()
        .map(|_| started.elapsed())
}

#[tokio::test]
async fn a_tls_client_that_negotiates_h2_and_sends_no_request_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let f = fixture("[server]\nheader_timeout = \"300ms\"").await;
    // Silent after the handshake; and, once authenticated by nothing but TLS, a preface and
    // SETTINGS and then silence: both are closed within header_timeout (300 ms here).
    for sent in [Vec::new(), h2wire::client_start()] {
        let mut tls = tls_connect(&f, b"h2", &f.client_ca, None).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls.write_all(&sent).await.unwrap();
        // Whatever the gateway wrote (its SETTINGS) is read and ignored here.
        let took = closed_within(&mut tls, Duration::from_secs(10)).await;
        let took = took.unwrap_or_else(|| {
            panic!(
                "an h2 client that sent {} bytes kept its connection",
                sent.len()
            )
        });
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    assert_eq!(f.mock.state.count(), 0);
    expect_metric(f.gw.admin, &closed_series("no_request"), 2).await;
}

#[tokio::test]
async fn an_authenticated_tls_client_is_closed_when_idle_or_silent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // HTTP/1.1 idles out after the smaller of header_timeout and idle_timeout (hyper's header
    // timer runs between requests): 500 ms; HTTP/2 after idle_timeout: 800 ms. A close is never
    // earlier (idleness is sampled, and counts from the last request).
    let f = fixture("[server]\nheader_timeout = \"500ms\"\nidle_timeout = \"800ms\"").await;
    let ops = || {
        Some(ClientCert {
            uri: Some(SPIFFE_OPS),
            ..Default::default()
        })
    };
    // HTTP/1.1 with a client certificate: one request, then silence.
    let mut h1 = tls_connect(&f, b"http/1.1", &f.client_ca, ops())
        .await
        .unwrap();
    h1.write_all(b"GET /api/v1/clusters HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut status = [0u8; 12];
    h1.read_exact(&mut status).await.unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
    let took = closed_within(&mut h1, Duration::from_secs(5))
        .await
        .expect("an idle authenticated HTTP/1.1 connection stayed open");
    assert!(took >= Duration::from_millis(450), "closed after {took:?}");

    // HTTP/2 with a client certificate: one request, then no stream open: GOAWAY, then the
    // end of the connection (the peer answers PINGs, as a live client does).
    let mut h2 = tls_connect(&f, b"h2", &f.client_ca, ops()).await.unwrap();
    let request = h2wire::get(1, "https", "127.0.0.1", "/api/v1/clusters");
    h2.write_all(&[h2wire::client_start(), request].concat())
        .await
        .unwrap();
    let seen = h2wire::exchange(&mut h2, true, Duration::from_secs(5)).await;
    assert!(
        seen.closed,
        "an idle authenticated HTTP/2 connection stayed open"
    );
    let response = seen.first(h2wire::HEADERS).expect("a response");
    // `:status: 200` is entry 8 of HPACK's static table: the client was let in.
    assert_eq!(response.payload.first(), Some(&0x88), "{response:?}");
    let answered = seen.stream_end(1).expect("the response ended");
    let goaway = seen.first(h2wire::GOAWAY).expect("a GOAWAY before the end");
    assert!(
        goaway.at - answered >= Duration::from_millis(750),
        "GOAWAY {:?} after the last response",
        goaway.at - answered
    );

    // HTTP/2 with a client certificate and no request: cut off at header_timeout.
    let mut silent = tls_connect(&f, b"h2", &f.client_ca, ops()).await.unwrap();
    silent.write_all(&h2wire::client_start()).await.unwrap();
    let seen = h2wire::exchange(&mut silent, true, Duration::from_secs(5)).await;
    assert!(
        seen.closed,
        "an authenticated HTTP/2 client without a request kept its connection"
    );

    let records = f.gw.wait_audit(2).await;
    assert!(
        records.iter().all(|r| r["client"]["auth"] == "mtls"),
        "{records:?}"
    );
    expect_metric(f.gw.admin, &closed_series("idle_timeout"), 2).await;
    expect_metric(f.gw.admin, &closed_series("no_request"), 1).await;
}

#[tokio::test]
async fn failed_and_stalled_tls_handshakes_are_closed_and_counted() {
    use tokio::io::AsyncWriteExt;
    let f = fixture("[server]\nheader_timeout = \"300ms\"").await;
    // Clear text to the TLS listener.
    raw_exchange(
        f.gw.proxy,
        b"GET /api/v1/clusters HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .await;
    // A client certificate from a CA the gateway does not trust: the handshake fails on the
    // server's side (under TLS 1.3 the client may learn it only when it reads).
    let stranger = TestCa::new("not the client CA");
    if let Ok(mut tls) = tls_connect(
        &f,
        b"http/1.1",
        &stranger,
        Some(ClientCert {
            uri: Some(SPIFFE_OPS),
            ..Default::default()
        }),
    )
    .await
    {
        let _ = tls.write_all(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n").await;
        assert!(
            closed_within(&mut tls, Duration::from_secs(5))
                .await
                .is_some()
        );
    }
    // A TCP connection that never starts its handshake.
    let mut silent = tokio::net::TcpStream::connect(f.gw.proxy).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5))
            .await
            .is_some()
    );
    assert_eq!(f.mock.state.count(), 0);
    expect_metric(f.gw.admin, &closed_series("tls_handshake_failed"), 2).await;
    expect_metric(f.gw.admin, &closed_series("tls_handshake_timeout"), 1).await;
}

#[tokio::test]
async fn a_review_without_the_gateways_audience_is_refused() {
    let f = fixture("").await;
    // The API server says "authenticated" but names no audience: the token was checked for the
    // API server's own audience, not the gateway's.
    let api_server_token = sa_token("velero-apiserver");
    f.kube
        .add_without_audiences(&api_server_token, "velero", "server");
    let reply = f.get("/api/v1/clusters", Some(&api_server_token)).await;
    assert!(
        reply.envelope_message(401).contains("audience"),
        "{}",
        reply.text()
    );
    assert_eq!(f.kube.reviews(), 1);
    assert_eq!(f.mock.state.count(), 0, "nothing reached the upstream");
}

/// A JWT with the given header and claims, unsigned (the fake API server does not verify).
fn jwt(header: serde_json::Value, claims: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!("{}.{}.c2ln", b64(&header), b64(&claims))
}

#[tokio::test]
async fn junk_tokens_never_reach_the_api_server() {
    let f = fixture("").await;
    let far = 4_000_000_000u64;
    for i in 0..150u64 {
        let junk = match i % 5 {
            // JWT-shaped bytes that are not JSON.
            0 => format!("eyJh{i}.eyJi{i}.c2ln"),
            // Symmetric or no algorithm: not what the API server signs with.
            1 => jwt(json!({"alg": "HS256"}), json!({"exp": far, "n": i})),
            2 => jwt(json!({"alg": "none"}), json!({"exp": far, "n": i})),
            // Expired.
            3 => jwt(json!({"alg": "RS256"}), json!({"exp": 1_000 + i})),
            // Issued for another audience.
            _ => jwt(
                json!({"alg": "RS256"}),
                json!({"exp": far, "aud": ["https://kubernetes.default.svc"], "n": i}),
            ),
        };
        f.get("/api/v1/clusters", Some(&junk))
            .await
            .envelope_message(401);
    }
    assert_eq!(f.kube.reviews(), 0, "junk was sent for review");
}

#[tokio::test]
async fn token_reviews_are_bounded_in_rate() {
    let f = fixture_with("", "review_rate = \"5/m\"").await;
    let far = 4_000_000_000u64;
    let mut throttled = 0;
    for i in 0..40u64 {
        // Plausible tokens the API server does not know: each needs a review.
        let token = jwt(
            json!({"alg": "RS256"}),
            json!({"exp": far, "aud": ["cloudcasa-gateway"], "n": i}),
        );
        let reply = f.get("/api/v1/clusters", Some(&token)).await;
        match reply.status.as_u16() {
            401 => {}
            503 => {
                assert!(reply.header("retry-after").is_some(), "no Retry-After");
                assert!(reply.envelope_message(503).contains("retry"));
                throttled += 1;
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    assert_eq!(
        f.kube.reviews(),
        5,
        "the burst of the 5/m budget, then no more"
    );
    assert_eq!(throttled, 35);
    let metrics = get(&f.gw.admin_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("reason=\"identity_throttled\"} 35"),
        "{metrics}"
    );
}

#[tokio::test]
async fn token_reviews_are_bounded_in_concurrency() {
    // Two reviews at a time; each takes 3 s at the API server. Six callers with plausible
    // tokens arrive together: two are reviewed, four are told to retry, none waits in a queue.
    let f = fixture_with("", "max_concurrent_reviews = 2\nreview_rate = \"1000/s\"").await;
    f.kube.set_delay(Duration::from_secs(3));
    let far = 4_000_000_000u64;
    let calls = (0..6u64).map(|i| {
        let token = jwt(
            json!({"alg": "RS256"}),
            json!({"exp": far, "aud": ["cloudcasa-gateway"], "n": i}),
        );
        let f = &f;
        async move { f.get("/api/v1/clusters", Some(&token)).await }
    });
    let replies = futures_util::future::join_all(calls).await;
    let mut statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [401, 401, 503, 503, 503, 503],
        "two reviewed, four throttled"
    );
    for reply in replies.iter().filter(|r| r.status.as_u16() == 503) {
        assert!(reply.header("retry-after").is_some(), "no Retry-After");
        assert!(reply.envelope_message(503).contains("retry"));
    }
    assert_eq!(f.kube.reviews(), 2, "never more than two at the API server");
    let metrics = get(&f.gw.admin_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("reason=\"identity_throttled\"} 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn identities_of_different_kinds_never_collide() {
    // The rule names the API key backup-bot; a certificate whose CN (or DNS SAN) is backup-bot
    // is another identity.
    let f = fixture("").await;
    for cert in [
        ClientCert {
            cn: Some("backup-bot"),
            ..Default::default()
        },
        ClientCert {
            dns: Some("backup-bot"),
            ..Default::default()
        },
    ] {
        let reply = f
            .send(Method::GET, "/api/v1/clusters", None, Some(cert))
            .await
            .unwrap();
        let message = reply.envelope_message(403);
        assert!(
            message.contains("'cn:backup-bot'") || message.contains("'dns:backup-bot'"),
            "{message}"
        );
    }
    let by_key = f.get("/api/v1/clusters", Some(BOT_KEY)).await;
    assert_eq!(by_key.status, StatusCode::OK, "{}", by_key.text());
    let records = f.gw.wait_audit(3).await;
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r["client"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["cn:backup-bot", "dns:backup-bot", "apikey:backup-bot"]
    );
}

/// One sample of the exposition, by its full series name (`name{labels}`), or None.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// `tls_certificate_not_after_seconds{listener="proxy"}` is the serving certificate's notAfter,
/// and follows the certificate when it is renewed.
#[tokio::test]
async fn the_certificate_expiry_metric_is_the_listeners_not_after() {
    let f = fixture("").await;
    let series = "cloudcasa_gateway_tls_certificate_not_after_seconds{listener=\"proxy\"}";
    let scrape = || async { get(&f.gw.admin_url("/metrics"), &[]).await.text() };
    // The fixture's certificate has rcgen's default validity end, 4096-01-01T00:00:00Z.
    let metrics = scrape().await;
    assert_eq!(
        sample(&metrics, series),
        Some(67_090_118_400.0),
        "{metrics}"
    );

    let (cert, key) = f.server_ca.leaf_pem_until(&["127.0.0.1"], (2031, 5, 17));
    write(f.dir.path(), "tls.key", &key);
    write(f.dir.path(), "tls.crt", &cert);
    // 2031-05-17T00:00:00Z.
    eventually(
        Duration::from_secs(10),
        "the renewed certificate's notAfter",
        || async { sample(&scrape().await, series) == Some(1_936_742_400.0) },
    )
    .await;
}

/// Real reviews against the fake API server are counted by result and timed; a review answered
/// from the gateway's cache, and a token refused before any call, add no latency sample.
#[tokio::test]
async fn token_reviews_are_counted_and_timed_by_result() {
    let f = fixture("").await;
    let velero = sa_token("velero");
    f.kube
        .add(&velero, "velero", "server", &["cloudcasa-gateway"]);
    for _ in 0..2 {
        let ok = f.get("/api/v1/clusters", Some(&velero)).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    }
    for name in ["stranger-1", "stranger-2"] {
        f.get("/api/v1/clusters", Some(&sa_token(name)))
            .await
            .envelope_message(401);
    }
    f.get("/api/v1/clusters", Some("eyJnot.a.jwt"))
        .await
        .envelope_message(401);
    assert_eq!(
        f.kube.reviews(),
        3,
        "one for velero (then cached), one per stranger"
    );

    let metrics = get(&f.gw.admin_url("/metrics"), &[]).await.text();
    let value = |series: &str| {
        sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    let reviews = "cloudcasa_gateway_token_reviews_total";
    assert_eq!(
        value(&format!("{reviews}{{result=\"authenticated\"}}")),
        1.0
    );
    assert_eq!(value(&format!("{reviews}{{result=\"refused\"}}")), 2.0);
    assert_eq!(value(&format!("{reviews}{{result=\"error\"}}")), 0.0);
    assert_eq!(value(&format!("{reviews}{{result=\"prechecked\"}}")), 1.0);
    let duration = "cloudcasa_gateway_token_review_duration_seconds";
    for (result, calls) in [("authenticated", 1.0), ("refused", 2.0)] {
        let label = format!("{{result=\"{result}\"}}");
        assert_eq!(
            value(&format!("{duration}_count{label}")),
            calls,
            "{result}"
        );
        // A call over TLS to another task takes some time: the samples are real ones.
        let sum = value(&format!("{duration}_sum{label}"));
        assert!(sum > 0.0 && sum.is_finite(), "{result}: {sum}");
        assert_eq!(
            value(&format!(
                "{duration}_bucket{{le=\"+Inf\",result=\"{result}\"}}"
            )),
            calls,
            "{metrics}"
        );
    }
}
