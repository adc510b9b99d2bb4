//! deploy-rs's target syntax: `.`, `path/to/flake`, `flake#node`, `flake#node.profile`, with
//! quoted names that contain dots (`.#"web.prod".system`).

/// One parsed TARGET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The flake reference (`.` when empty).
    pub flake: String,
    /// A node, or every node.
    pub node: Option<String>,
    /// A profile of that node, or every profile.
    pub profile: Option<String>,
}

/// Why a TARGET could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "target `{target}`: {reason} (expected FLAKE, FLAKE#NODE or FLAKE#NODE.PROFILE; quote names with dots: '.#\"web.prod\".system')"
)]
pub struct TargetError {
    target: String,
    reason: &'static str,
}

/// Parses a TARGET.
pub fn parse(target: &str) -> Result<Target, TargetError> {
    let err = |reason| TargetError {
        target: target.to_owned(),
        reason,
    };
    let (flake, fragment) = match target.split_once('#') {
        Some((f, frag)) => (f, Some(frag)),
        None => (target, None),
    };
    let flake = if flake.is_empty() { "." } else { flake }.to_owned();
    let Some(fragment) = fragment else {
        return Ok(Target {
            flake,
            node: None,
            profile: None,
        });
    };
    let mut parts = Vec::new();
    let mut chars = fragment.chars().peekable();
    while chars.peek().is_some() {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(err("unterminated quote")),
                }
            }
            match chars.next() {
                None | Some('.') => {}
                Some(_) => return Err(err("expected `.` after a quoted name")),
            }
        } else {
            for c in chars.by_ref() {
                if c == '.' {
                    break;
                }
                part.push(c);
            }
        }
        if part.is_empty() {
            return Err(err("empty name"));
        }
        parts.push(part);
    }
    match parts.len() {
        0 => Ok(Target {
            flake,
            node: None,
            profile: None,
        }),
        1 => Ok(Target {
            flake,
            node: Some(parts.remove(0)),
            profile: None,
        }),
        2 => {
            let profile = parts.pop();
            Ok(Target {
                flake,
                node: parts.pop(),
                profile,
            })
        }
        _ => Err(err("too many parts")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(flake: &str, node: Option<&str>, profile: Option<&str>) -> Target {
        Target {
            flake: flake.into(),
            node: node.map(Into::into),
            profile: profile.map(Into::into),
        }
    }

    #[test]
    fn deploy_rs_target_syntax() {
        assert_eq!(parse(".").unwrap(), t(".", None, None));
        assert_eq!(
            parse("path/to/flake").unwrap(),
            t("path/to/flake", None, None)
        );
        assert_eq!(parse(".#laptop").unwrap(), t(".", Some("laptop"), None));
        assert_eq!(parse("#laptop").unwrap(), t(".", Some("laptop"), None));
        assert_eq!(
            parse(".#laptop.home").unwrap(),
            t(".", Some("laptop"), Some("home"))
        );
        assert_eq!(
            parse(".#\"web.prod\".system").unwrap(),
            t(".", Some("web.prod"), Some("system"))
        );
        assert_eq!(
            parse("github:acme/fleet#\"web.prod\"").unwrap(),
            t("github:acme/fleet", Some("web.prod"), None)
        );
    }

    /// deploy-rs's own `parse_flake` test vectors (src/lib.rs, `test_parse_flake`): the same
    /// inputs give the same repository, node and profile.
    #[test]
    fn deploy_rs_parse_flake_vectors() {
        let repo = "../deploy/examples/system";
        for (input, node, profile) in [
            ("../deploy/examples/system", None, None),
            ("../deploy/examples/system#", None, None),
            (
                "../deploy/examples/system#computer.\"something.nix\"",
                Some("computer"),
                Some("something.nix"),
            ),
            (
                "../deploy/examples/system#\"example.com\".system",
                Some("example.com"),
                Some("system"),
            ),
            ("../deploy/examples/system#example", Some("example"), None),
            (
                "../deploy/examples/system#example.system",
                Some("example"),
                Some("system"),
            ),
        ] {
            assert_eq!(parse(input).unwrap(), t(repo, node, profile), "{input}");
        }
    }

    /// deploy-rs refuses a fragment with a second dot ("The given path was too long").
    #[test]
    fn a_third_part_is_refused_as_deploy_rs_does() {
        assert!(parse("../deploy/examples/system#a.b.c").is_err());
        assert!(parse("../deploy/examples/system#\"a.b\".c.d").is_err());
    }

    #[test]
    fn malformed_targets_are_explained() {
        assert!(
            parse(".#\"web.prod")
                .unwrap_err()
                .to_string()
                .contains("unterminated quote")
        );
        assert!(
            parse(".#a.b.c")
                .unwrap_err()
                .to_string()
                .contains("too many parts")
        );
        assert!(
            parse(".#a..b")
                .unwrap_err()
                .to_string()
                .contains("empty name")
        );
    }
}
