//! `[token]` and `[[credentials]]`: the CloudCasa credentials and where each token is read from.

use std::path::PathBuf;

use super::{Overrides, Problems, raw};

/// One `[[credentials]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialConfig {
    /// Name used by policy rules, audit records and metrics.
    pub name: String,
    /// File or environment variable.
    pub origin: TokenOrigin,
}

/// Where a token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOrigin {
    /// A file, typically a key of a Secret mounted as a volume.
    File(PathBuf),
    /// An environment variable, read once at start.
    Env(String),
}

fn token_origin(
    p: &mut Problems,
    section: &str,
    file: Option<PathBuf>,
    env: Option<String>,
) -> Option<TokenOrigin> {
    match (file, env) {
        (Some(file), None) => Some(TokenOrigin::File(file)),
        (None, Some(env)) if !env.is_empty() => Some(TokenOrigin::Env(env)),
        (None, Some(_)) => {
            p.add(
                &format!("{section}.env"),
                "must name an environment variable",
            );
            None
        }
        (Some(_), Some(_)) => {
            p.add(
                section,
                format!("set exactly one of {section}.file and {section}.env, not both"),
            );
            None
        }
        (None, None) => {
            p.add(
                section,
                format!("set {section}.file (a mounted Secret) or {section}.env"),
            );
            None
        }
    }
}

/// `[token]` (the credential named `default`) and `[[credentials]]`.
pub(super) fn credentials(
    p: &mut Problems,
    token: &raw::RawToken,
    named: &[raw::RawCredential],
    overrides: &Overrides,
) -> Vec<CredentialConfig> {
    let mut out = Vec::new();
    let token_file = overrides.token_file.clone().or(token.file.clone());
    let has_token = token_file.is_some() || token.env.is_some();
    if (has_token || named.is_empty())
        && let Some(origin) = token_origin(p, "token", token_file, token.env.clone())
    {
        out.push(CredentialConfig {
            name: "default".into(),
            origin,
        });
    }
    for (i, c) in named.iter().enumerate() {
        let section = format!("credentials[{i}]");
        let name = match c.name.as_deref() {
            Some(n)
                if !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
            {
                n
            }
            Some(n) => {
                p.add(
                    &format!("{section}.name"),
                    format!("{n:?} must be letters, digits, '-', '_' or '.'"),
                );
                continue;
            }
            None => {
                p.add(&format!("{section}.name"), "is required");
                continue;
            }
        };
        if out.iter().any(|o: &CredentialConfig| o.name == name) {
            p.add(
                &format!("{section}.name"),
                format!("{name:?} is defined twice ([token] is the credential named \"default\")"),
            );
            continue;
        }
        if let Some(origin) = token_origin(p, &section, c.file.clone(), c.env.clone()) {
            out.push(CredentialConfig {
                name: name.to_string(),
                origin,
            });
        }
    }
    out
}
