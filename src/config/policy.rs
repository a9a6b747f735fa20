//! The `[[policy]]` rules as validated types: who (client globs), what (methods, path globs),
//! with which credential, and how often (a [`Rate`]). Everything that can be wrong with a rule is
//! found here, at validation, so nothing `--check` accepts can fail at start; the policy layer
//! only matches requests against these.

use std::num::NonZeroU32;
use std::time::Duration;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use governor::Quota;
use http::Method;

use super::credentials::CredentialConfig;
use super::{Problems, raw};

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
                    // Paths are matched as the upstream routes them, without a trailing slash
                    // (`http::resource::routed`): such a pattern would never match.
                    if path.len() > 1 && path.ends_with('/') {
                        return Err((
                            "paths",
                            format!(
                                "{path:?} ends in /, which never matches: paths are matched \
                                 without their trailing slash, as the upstream routes them \
                                 (write {:?})",
                                match path.trim_end_matches('/') {
                                    "" => "/",
                                    trimmed => trimmed,
                                }
                            ),
                        ));
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

    /// Whether this rule covers `client` calling `method` on `path`.
    pub fn matches(&self, client: &str, method: &Method, path: &str) -> bool {
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

/// Validates `[[policy]]` against the credentials defined.
pub(super) fn policy(
    p: &mut Problems,
    rules: Vec<raw::RawPolicy>,
    credentials: &[CredentialConfig],
) -> Vec<RuleSpec> {
    let mut out = Vec::new();
    for (i, r) in rules.into_iter().enumerate() {
        let key = |field: &str| format!("policy[{i}].{field}");
        let name = r.name.unwrap_or_else(|| format!("policy[{i}]"));
        // A rule's name identifies it in audit records, spans and, in a fleet, its rate budget
        // in Redis: two rules of one name would share one budget there but not in one replica.
        if out.iter().any(|o: &RuleSpec| o.name == name) {
            p.add(
                &key("name"),
                format!("{name:?} names an earlier rule too; rule names must be unique"),
            );
        }
        let credential = match r.credential {
            Some(c) if credentials.iter().any(|k| k.name == c) => c,
            Some(c) => {
                let known: Vec<_> = credentials.iter().map(|k| k.name.as_str()).collect();
                p.add(
                    &key("credential"),
                    format!("no credential named {c:?} (defined: {})", known.join(", ")),
                );
                continue;
            }
            None => {
                p.add(
                    &key("credential"),
                    "is required: the credential this rule's requests use",
                );
                continue;
            }
        };
        let rate = match r.rate.as_deref().map(Rate::parse) {
            None => None,
            Some(Ok(rate)) => Some(rate),
            Some(Err(e)) => {
                p.add(&key("rate"), e);
                None
            }
        };
        let Some(clients) = r.clients.filter(|c| !c.is_empty()) else {
            p.add(
                &key("clients"),
                "is required: client ids or globs, e.g. [\"system:serviceaccount:velero:*\"]",
            );
            continue;
        };
        match RuleSpec::new(name, clients, r.methods, r.paths, credential, rate) {
            Ok(rule) => out.push(rule),
            Err((field, message)) => p.add(&key(field), message),
        }
    }
    if out.is_empty() && credentials.len() > 1 {
        p.add(
            "policy",
            "with more than one credential, [[policy]] rules must say which client uses which",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_rule(
        clients: &[&str],
        methods: Option<&[&str]>,
        paths: Option<&[&str]>,
    ) -> Result<RuleSpec, (&'static str, String)> {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        RuleSpec::new(
            "r".into(),
            v(clients),
            methods.map(v),
            paths.map(v),
            "c".into(),
            None,
        )
    }

    fn rule(clients: &[&str], methods: Option<&[&str]>, paths: Option<&[&str]>) -> RuleSpec {
        try_rule(clients, methods, paths).unwrap()
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

        assert!(rule(&["*"], None, Some(&["/"])).matches("x", &Method::GET, "/"));

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
        let err = try_rule(&["apikey:a["], None, None).unwrap_err();
        assert_eq!(err.0, "clients");
        let err = try_rule(&["apikey:a"], None, Some(&["api/**"])).unwrap_err();
        assert_eq!(err.0, "paths");
        let err = try_rule(&["apikey:a"], Some(&["G T"]), None).unwrap_err();
        assert_eq!(err.0, "methods");
        // Paths are matched without their trailing slash: a pattern ending in one never would.
        let (key, message) = try_rule(&["*"], None, Some(&["/api/v1/clusters/"])).unwrap_err();
        assert_eq!(key, "paths");
        assert!(message.contains("write \"/api/v1/clusters\""), "{message}");
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

    #[test]
    fn rule_names_are_unique() {
        use crate::config::{Config, Overrides};
        let problems = |rules: &str| {
            let text = format!("[token]\nfile = \"/t\"\n{rules}");
            match Config::from_raw(Config::parse(&text).unwrap(), &Overrides::default()) {
                Ok(_) => Vec::new(),
                Err(p) => p.into_iter().map(|p| p.key).collect(),
            }
        };
        let rule = |name: &str| {
            format!("[[policy]]\n{name}clients = [\"local\"]\ncredential = \"default\"\n")
        };
        assert!(problems(&(rule("name = \"a\"\n") + &rule("name = \"b\"\n"))).is_empty());
        assert_eq!(
            problems(&(rule("name = \"a\"\n") + &rule("name = \"a\"\n"))),
            ["policy[1].name"]
        );
        // An explicit name cannot take an unnamed rule's default one.
        assert_eq!(
            problems(&(rule("") + &rule("name = \"policy[0]\"\n"))),
            ["policy[1].name"]
        );
    }
}
