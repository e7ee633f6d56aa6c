//! Route planning: from a domain's MX answer to the ordered hosts to try.
//!
//! Pure: the DNS answer comes in as a value ([`MxAnswer`]) and the plan goes
//! out as a value ([`Plan`]), so every rule is unit-tested without a network.
//!
//! The rules (DESIGN.md, "Holding and relaying"): MX hosts under a magic
//! suffix and the node's own names are dropped, so a node never relays to
//! itself or to another magic node; the rest are sorted by preference with
//! equal preferences shuffled (RFC 5321 5.1); a domain without MX is its own
//! implicit MX; a null MX (RFC 7505) and a domain that does not exist are
//! permanent failures; a domain whose only MX hosts are magic cannot be
//! relayed now, which is a temporary failure (the owner may fix the zone).

use rand::seq::SliceRandom;

use super::deliver::{Diagnostic, Status};
use crate::config::Config;
use crate::dns::{MxAnswer, MxHost};
use crate::names::normalize_name;

/// What to do with a domain's recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Try these hosts in this order.
    Hosts(Vec<String>),
    /// Defer the recipients with this reason.
    TempFail(Diagnostic),
    /// Fail the recipients with this reason.
    PermFail(Diagnostic),
}

/// Plans the route to `domain` from its MX answer.
pub fn plan(domain: &str, answer: MxAnswer, config: &Config) -> Plan {
    plan_with(domain, answer, config, &mut rand::rng())
}

/// [`plan`] with the random source given, for tests.
pub fn plan_with<R: rand::Rng + ?Sized>(
    domain: &str,
    answer: MxAnswer,
    config: &Config,
    rng: &mut R,
) -> Plan {
    let domain = normalize_name(domain);
    let mut hosts = match answer {
        MxAnswer::NullMx => {
            return Plan::PermFail(Diagnostic::local(
                Status::new(5, 1, 10),
                format!("domain accepts no mail (null MX): {domain}"),
            ))
        }
        MxAnswer::NoDomain => {
            return Plan::PermFail(Diagnostic::local(
                Status::new(5, 1, 2),
                format!("domain {domain} does not exist (NXDOMAIN)"),
            ))
        }
        MxAnswer::NoMx => vec![MxHost {
            preference: 0,
            host: domain.clone(),
        }],
        MxAnswer::Hosts(hosts) => hosts,
    };
    let total = hosts.len();
    hosts.retain(|h| !config.is_magic_host(&h.host) && !config.is_own_name(&h.host));
    if hosts.is_empty() {
        tracing::warn!(
            domain = %domain,
            mx_hosts = total,
            "every MX host is magic or this node: nowhere to relay"
        );
        return Plan::TempFail(Diagnostic::local(
            Status::new(4, 4, 4),
            format!("no relayable MX host for {domain}: every MX host is magic or this node"),
        ));
    }
    // Shuffle, then a stable sort: equal preferences end up in random order.
    hosts.shuffle(rng);
    hosts.sort_by_key(|h| h.preference);
    let mut out: Vec<String> = Vec::with_capacity(hosts.len());
    for h in hosts {
        let host = normalize_name(&h.host);
        if !out.contains(&host) {
            out.push(host);
        }
    }
    Plan::Hosts(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn config() -> Config {
        let c = Config::parse(
            "[node]\nname = \"n1\"\nhostname = \"mx1.magic.test\"\nnames = [\"relay.local.test\"]\nmagic_suffixes = [\".magic.test\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        c
    }

    fn mx(preference: u16, host: &str) -> MxHost {
        MxHost {
            preference,
            host: host.into(),
        }
    }

    fn hosts(plan: Plan) -> Vec<String> {
        match plan {
            Plan::Hosts(h) => h,
            other => panic!("expected hosts, got {other:?}"),
        }
    }

    #[test]
    fn magic_and_own_hosts_are_dropped_and_the_rest_sorted() {
        let answer = MxAnswer::Hosts(vec![
            mx(30, "backup.example.org"),
            mx(10, "mx2.magic.test"),
            mx(10, "MX1.MAGIC.TEST."),
            mx(20, "mail.example.org"),
            mx(5, "relay.local.test"),
        ]);
        assert_eq!(
            hosts(plan("Example.org", answer, &config())),
            vec!["mail.example.org", "backup.example.org"]
        );
    }

    #[test]
    fn equal_preferences_are_shuffled() {
        let answer = MxAnswer::Hosts(vec![
            mx(20, "c.example.org"),
            mx(10, "a1.example.org"),
            mx(10, "a2.example.org"),
            mx(10, "a3.example.org"),
        ]);
        let c = config();
        let mut seen_first = std::collections::HashSet::new();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let h = hosts(plan_with("example.org", answer.clone(), &c, &mut rng));
            assert_eq!(h.len(), 4);
            assert!(h[..3].iter().all(|x| x.starts_with('a')), "{h:?}");
            assert_eq!(h[3], "c.example.org");
            seen_first.insert(h[0].clone());
        }
        assert_eq!(
            seen_first.len(),
            3,
            "every equal-preference host comes first sometimes"
        );
    }

    #[test]
    fn no_mx_means_the_domain_itself() {
        assert_eq!(
            hosts(plan("Example.ORG.", MxAnswer::NoMx, &config())),
            vec!["example.org"]
        );
    }

    #[test]
    fn implicit_mx_that_is_magic_is_temporary() {
        assert!(matches!(
            plan("mx9.magic.test", MxAnswer::NoMx, &config()),
            Plan::TempFail(_)
        ));
    }

    #[test]
    fn null_mx_is_permanent() {
        match plan("example.org", MxAnswer::NullMx, &config()) {
            Plan::PermFail(r) => assert!(
                r.to_string()
                    .starts_with("5.1.10 domain accepts no mail (null MX)"),
                "{r}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nxdomain_is_permanent() {
        match plan("nowhere.example", MxAnswer::NoDomain, &config()) {
            Plan::PermFail(r) => assert!(r.to_string().starts_with("5.1.2 "), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_magic_hosts_is_temporary() {
        let answer = MxAnswer::Hosts(vec![mx(10, "mx1.magic.test"), mx(20, "mx2.magic.test")]);
        match plan("example.org", answer, &config()) {
            Plan::TempFail(r) => assert!(r.to_string().starts_with("4.4.4 "), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn duplicate_hosts_are_tried_once() {
        let answer = MxAnswer::Hosts(vec![
            mx(10, "mail.example.org"),
            mx(20, "Mail.Example.org."),
        ]);
        assert_eq!(
            hosts(plan("example.org", answer, &config())),
            vec!["mail.example.org"]
        );
    }
}
