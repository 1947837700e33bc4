//! etcd's own roles and users for the registry: each cluster may write only its own keys, the
//! policy administrator only the policies, the reader nothing (`strait registry roles apply`).
//!
//! What each role may do is a pure function of the cluster names ([`plan`]); [`apply`] compares
//! it with what etcd holds and changes only the difference, so running it twice changes nothing.
//!
//! | role (and user) | read-write | read |
//! | --- | --- | --- |
//! | `strait-cluster-C` | the keys `/strait/v1/clusters/C`, `/strait/v1/withdrawn/C` and `/strait/v1/leaders/C`; the prefixes `/strait/v1/endpoints/C/`, `/strait/v1/links/C/`, `/strait/v1/peerings/C/` | `/strait/v1/` |
//! | `strait-policy-admin` | `/strait/v1/policies/` | `/strait/v1/` |
//! | `strait-reader` | — | `/strait/v1/` |
//!
//! A cluster's record is one key, not a prefix: a prefix `/strait/v1/clusters/east` would also
//! cover `/strait/v1/clusters/east2`.

use std::collections::BTreeMap;

use etcd_client::{Permission, PermissionType, RoleRevokePermissionOptions, UserAddOptions};

use super::RegistryError;
use super::backend::prefix_end;
use super::codec::ROOT;
use super::etcd::EtcdBackend;
use crate::model::ClusterId;

/// The role (and user) that may write the policies.
pub const POLICY_ADMIN: &str = "strait-policy-admin";
/// The role (and user) that may only read.
pub const READER: &str = "strait-reader";
/// Every role Strait manages starts with this.
pub const ROLE_PREFIX: &str = "strait-";

/// The role (and user) of a cluster's control plane and gateway.
pub fn cluster_role(cluster: &ClusterId) -> String {
    format!("strait-cluster-{cluster}")
}

/// What a permission allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    fn etcd(self) -> PermissionType {
        match self {
            Access::Read => PermissionType::Read,
            Access::Write => PermissionType::Write,
            Access::ReadWrite => PermissionType::Readwrite,
        }
    }

    fn from_etcd(t: i32) -> Option<Self> {
        match PermissionType::try_from(t).ok()? {
            PermissionType::Read => Some(Access::Read),
            PermissionType::Write => Some(Access::Write),
            PermissionType::Readwrite => Some(Access::ReadWrite),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "readwrite",
        }
    }
}

/// One permission: a key (`range_end` empty) or a range (a prefix: `range_end` is the prefix's
/// end).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub access: Access,
}

impl Grant {
    pub fn key(key: &str, access: Access) -> Self {
        Self {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
            access,
        }
    }

    pub fn prefix(prefix: &str, access: Access) -> Self {
        Self {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            access,
        }
    }

    /// Whether two grants cover the same keys (whatever their access).
    fn same_range(&self, other: &Grant) -> bool {
        self.key == other.key && self.range_end == other.range_end
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = String::from_utf8_lossy(&self.key);
        if self.range_end.is_empty() {
            write!(f, "{} {key}", self.access.as_str())
        } else if self.range_end == prefix_end(&key) {
            write!(f, "{} {key}* (prefix)", self.access.as_str())
        } else {
            write!(
                f,
                "{} [{key}, {})",
                self.access.as_str(),
                String::from_utf8_lossy(&self.range_end)
            )
        }
    }
}

/// A role and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSpec {
    pub name: String,
    pub grants: Vec<Grant>,
}

/// A user and its roles (a user per role, of the same name: a client certificate's common name
/// names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    pub roles: Vec<String>,
}

/// The roles and users of a federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub roles: Vec<RoleSpec>,
    pub users: Vec<UserSpec>,
}

/// The roles and users for `clusters`. `policy_writers`: clusters whose control plane may also
/// write the policies (it follows `FailoverPolicy` objects into the registry); none by default.
pub fn plan(clusters: &[ClusterId], policy_writers: &[ClusterId]) -> Plan {
    let mut roles = Vec::new();
    let mut users = Vec::new();
    let mut clusters: Vec<&ClusterId> = clusters.iter().collect();
    clusters.sort();
    clusters.dedup();
    for c in clusters {
        let name = cluster_role(c);
        roles.push(RoleSpec {
            name: name.clone(),
            grants: vec![
                Grant::key(&super::RegistryKey::cluster(c), Access::ReadWrite),
                Grant::key(&super::RegistryKey::withdrawn(c), Access::ReadWrite),
                Grant::key(&super::RegistryKey::leader(c), Access::ReadWrite),
                Grant::prefix(&super::RegistryKey::endpoints_prefix(c), Access::ReadWrite),
                Grant::prefix(&super::RegistryKey::links_prefix(c), Access::ReadWrite),
                Grant::prefix(&super::RegistryKey::peerings_prefix(c), Access::ReadWrite),
                Grant::prefix(ROOT, Access::Read),
            ],
        });
        let mut user_roles = vec![name.clone()];
        if policy_writers.contains(c) {
            user_roles.push(POLICY_ADMIN.to_string());
        }
        users.push(UserSpec {
            name,
            roles: user_roles,
        });
    }
    roles.push(RoleSpec {
        name: POLICY_ADMIN.to_string(),
        grants: vec![
            Grant::prefix(&super::RegistryKey::policies_prefix(), Access::ReadWrite),
            Grant::prefix(ROOT, Access::Read),
        ],
    });
    users.push(UserSpec {
        name: POLICY_ADMIN.to_string(),
        roles: vec![POLICY_ADMIN.to_string()],
    });
    roles.push(RoleSpec {
        name: READER.to_string(),
        grants: vec![Grant::prefix(ROOT, Access::Read)],
    });
    users.push(UserSpec {
        name: READER.to_string(),
        roles: vec![READER.to_string()],
    });
    for r in &mut roles {
        r.grants.sort();
    }
    Plan { roles, users }
}

/// What must change for a role holding `current` to hold exactly `desired`: grants to add (or
/// whose access changes: etcd replaces a grant of the same range) and ranges to revoke.
pub fn diff_grants(current: &[Grant], desired: &[Grant]) -> (Vec<Grant>, Vec<Grant>) {
    let grant = desired
        .iter()
        .filter(|d| !current.contains(d))
        .cloned()
        .collect();
    let revoke = current
        .iter()
        .filter(|c| !desired.iter().any(|d| d.same_range(c)))
        .cloned()
        .collect();
    (grant, revoke)
}

/// What must change for a user holding `current` roles: roles to grant, Strait roles to revoke
/// (roles not managed by Strait are left alone).
pub fn diff_roles(current: &[String], desired: &[String]) -> (Vec<String>, Vec<String>) {
    let grant = desired
        .iter()
        .filter(|d| !current.contains(d))
        .cloned()
        .collect();
    let revoke = current
        .iter()
        .filter(|c| c.starts_with(ROLE_PREFIX) && !desired.contains(c))
        .cloned()
        .collect();
    (grant, revoke)
}

/// How [`apply`] treats authentication.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Passwords to set, by user. A user without one is created without a password (it can
    /// only authenticate with a client certificate); an existing user's password is compared
    /// (by authenticating with it, which needs authentication on) and set when it differs.
    pub passwords: BTreeMap<String, String>,
    /// Turn authentication on, with this password for `root` (created when missing).
    pub enable_auth_root_password: Option<String>,
    /// Say what would change without changing it.
    pub dry_run: bool,
}

/// Make etcd hold `plan` and say what changed, one line each (none when nothing did).
pub async fn apply(
    backend: &EtcdBackend,
    plan: &Plan,
    options: &ApplyOptions,
) -> Result<Vec<String>, RegistryError> {
    let client = backend.raw_client().await?;
    let mut auth = client.auth_client();
    let err = |e: etcd_client::Error, what: &str| backend.map_error(e, what);
    let mut changes = Vec::new();
    let mut say = |line: String| changes.push(line);
    let dry = options.dry_run;

    let existing_roles: Vec<String> = auth
        .role_list()
        .await
        .map_err(|e| err(e, "list etcd roles"))?
        .roles()
        .to_vec();
    for role in &plan.roles {
        let current: Vec<Grant> = if existing_roles.contains(&role.name) {
            auth.role_get(role.name.as_str())
                .await
                .map_err(|e| err(e, &format!("read role {}", role.name)))?
                .permissions()
                .iter()
                .filter_map(|p| {
                    Some(Grant {
                        key: p.key().to_vec(),
                        range_end: p.range_end().to_vec(),
                        access: Access::from_etcd(p.get_type())?,
                    })
                })
                .collect()
        } else {
            say(format!("role {}: created", role.name));
            if !dry {
                auth.role_add(role.name.as_str())
                    .await
                    .map_err(|e| err(e, &format!("add role {}", role.name)))?;
            }
            Vec::new()
        };
        let (grant, revoke) = diff_grants(&current, &role.grants);
        for g in revoke {
            say(format!("role {}: revoked {g}", role.name));
            if !dry {
                let mut opts = RoleRevokePermissionOptions::new();
                if !g.range_end.is_empty() {
                    opts = opts.with_range_end(g.range_end.clone());
                }
                auth.role_revoke_permission(role.name.as_str(), g.key.clone(), Some(opts))
                    .await
                    .map_err(|e| err(e, &format!("revoke {g} from role {}", role.name)))?;
            }
        }
        for g in grant {
            say(format!("role {}: granted {g}", role.name));
            if !dry {
                let mut p = Permission::new(g.access.etcd(), g.key.clone());
                if !g.range_end.is_empty() {
                    p = p.with_range_end(g.range_end.clone());
                }
                auth.role_grant_permission(role.name.as_str(), p)
                    .await
                    .map_err(|e| err(e, &format!("grant {g} to role {}", role.name)))?;
            }
        }
    }
    for stale in existing_roles
        .iter()
        .filter(|r| r.starts_with("strait-cluster-") && !plan.roles.iter().any(|p| &p.name == *r))
    {
        say(format!(
            "role {stale}: not in this plan, left alone (remove it with `etcdctl role delete {stale}` when its cluster is gone)"
        ));
    }

    let auth_on = auth_enabled(backend).await?;
    let existing_users: Vec<String> = auth
        .user_list()
        .await
        .map_err(|e| err(e, "list etcd users"))?
        .users()
        .to_vec();
    for user in &plan.users {
        let password = options.passwords.get(&user.name);
        let mut recreate = false;
        if existing_users.contains(&user.name)
            && let Some(pw) = password
            && auth_on
        {
            match check_password(backend, &user.name, pw).await? {
                PasswordCheck::Matches => {}
                PasswordCheck::Differs => {
                    say(format!("user {}: password changed", user.name));
                    if !dry {
                        auth.user_change_password(user.name.as_str(), pw.as_str())
                            .await
                            .map_err(|e| {
                                err(e, &format!("change the password of user {}", user.name))
                            })?;
                    }
                }
                // etcd cannot give a password to a user created without one: make it again.
                PasswordCheck::NoPasswordUser => recreate = true,
            }
        }
        let current: Vec<String> = if existing_users.contains(&user.name) && !recreate {
            auth.user_get(user.name.as_str())
                .await
                .map_err(|e| err(e, &format!("read user {}", user.name)))?
                .roles()
                .to_vec()
        } else {
            let mut kept = Vec::new();
            if recreate {
                kept = auth
                    .user_get(user.name.as_str())
                    .await
                    .map_err(|e| err(e, &format!("read user {}", user.name)))?
                    .roles()
                    .to_vec();
                say(format!(
                    "user {}: made again with a password (it had none)",
                    user.name
                ));
                if !dry {
                    auth.user_delete(user.name.as_str())
                        .await
                        .map_err(|e| err(e, &format!("delete user {}", user.name)))?;
                }
            } else {
                say(format!(
                    "user {}: created ({})",
                    user.name,
                    if password.is_some() {
                        "with a password"
                    } else {
                        "no password: client certificate only"
                    }
                ));
            }
            if !dry {
                let opts = match password {
                    Some(_) => None,
                    None => Some(UserAddOptions::new().with_no_pwd()),
                };
                auth.user_add(
                    user.name.as_str(),
                    password.cloned().unwrap_or_default(),
                    opts,
                )
                .await
                .map_err(|e| err(e, &format!("add user {}", user.name)))?;
                // Roles it had that are not Strait's are given back.
                for r in kept.iter().filter(|r| !r.starts_with(ROLE_PREFIX)) {
                    auth.user_grant_role(user.name.as_str(), r.as_str())
                        .await
                        .map_err(|e| err(e, &format!("grant role {r} to user {}", user.name)))?;
                }
            }
            kept.retain(|r| !r.starts_with(ROLE_PREFIX));
            kept
        };
        let (grant, revoke) = diff_roles(&current, &user.roles);
        for r in revoke {
            say(format!("user {}: revoked role {r}", user.name));
            if !dry {
                auth.user_revoke_role(user.name.as_str(), r.as_str())
                    .await
                    .map_err(|e| err(e, &format!("revoke role {r} from user {}", user.name)))?;
            }
        }
        for r in grant {
            say(format!("user {}: granted role {r}", user.name));
            if !dry {
                auth.user_grant_role(user.name.as_str(), r.as_str())
                    .await
                    .map_err(|e| err(e, &format!("grant role {r} to user {}", user.name)))?;
            }
        }
    }

    if let Some(root_pw) = &options.enable_auth_root_password {
        if auth_on {
            // Already on (and we are root, or nothing above would have worked).
        } else {
            if !existing_users.iter().any(|u| u == "root") {
                say("user root: created (with a password)".to_string());
                if !dry {
                    auth.user_add("root", root_pw.as_str(), None)
                        .await
                        .map_err(|e| err(e, "add user root"))?;
                }
            }
            let root_roles = if existing_users.iter().any(|u| u == "root") {
                auth.user_get("root")
                    .await
                    .map_err(|e| err(e, "read user root"))?
                    .roles()
                    .to_vec()
            } else {
                Vec::new()
            };
            if !root_roles.iter().any(|r| r == "root") {
                say("user root: granted role root".to_string());
                if !dry {
                    auth.user_grant_role("root", "root")
                        .await
                        .map_err(|e| err(e, "grant role root to user root"))?;
                }
            }
            say("authentication: enabled".to_string());
            if !dry {
                auth.auth_enable()
                    .await
                    .map_err(|e| err(e, "enable authentication"))?;
            }
        }
    }
    Ok(changes)
}

/// Whether etcd has authentication on: asks etcd to authenticate a user that does not exist,
/// which it refuses differently when authentication is off.
pub async fn auth_enabled(backend: &EtcdBackend) -> Result<bool, RegistryError> {
    let mut auth = backend.raw_client().await?.auth_client();
    match auth
        .authenticate("strait-auth-probe".to_string(), "-".to_string())
        .await
    {
        Ok(_) => Ok(true),
        Err(etcd_client::Error::GRpcStatus(s))
            if s.message().contains("authentication is not enabled") =>
        {
            Ok(false)
        }
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("authentication failed") => {
            Ok(true)
        }
        Err(e) => Err(backend.map_error(e, "ask whether authentication is on")),
    }
}

enum PasswordCheck {
    Matches,
    Differs,
    NoPasswordUser,
}

async fn check_password(
    backend: &EtcdBackend,
    user: &str,
    password: &str,
) -> Result<PasswordCheck, RegistryError> {
    let mut auth = backend.raw_client().await?.auth_client();
    match auth
        .authenticate(user.to_string(), password.to_string())
        .await
    {
        Ok(_) => Ok(PasswordCheck::Matches),
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no password user") => {
            Ok(PasswordCheck::NoPasswordUser)
        }
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("authentication failed") => {
            Ok(PasswordCheck::Differs)
        }
        Err(e) => Err(backend.map_error(e, &format!("check the password of user {user}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClusterId {
        ClusterId::parse("cluster", s).unwrap()
    }

    #[test]
    fn a_cluster_may_write_exactly_its_own_keys() {
        let p = plan(&[id("west"), id("east"), id("east")], &[]);
        let names: Vec<_> = p.roles.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "strait-cluster-east",
                "strait-cluster-west",
                "strait-policy-admin",
                "strait-reader"
            ]
        );
        let east = &p.roles[0];
        let shown: Vec<String> = east.grants.iter().map(|g| g.to_string()).collect();
        assert_eq!(
            shown,
            [
                "read /strait/v1/* (prefix)",
                "readwrite /strait/v1/clusters/east",
                "readwrite /strait/v1/endpoints/east/* (prefix)",
                "readwrite /strait/v1/leaders/east",
                "readwrite /strait/v1/links/east/* (prefix)",
                "readwrite /strait/v1/peerings/east/* (prefix)",
                "readwrite /strait/v1/withdrawn/east",
            ]
        );
        // The cluster record is one key: east's role does not reach east2's record.
        let record = &east.grants[1];
        assert!(record.range_end.is_empty());
        // No write anywhere outside east's keys.
        for g in &east.grants {
            if g.access != Access::Read {
                let key = String::from_utf8_lossy(&g.key);
                assert!(key.contains("/east"), "{g}");
                assert!(key.ends_with('/') || g.range_end.is_empty(), "{g}");
            }
        }
        assert_eq!(p.users[0].roles, ["strait-cluster-east"]);
        let reader = p.roles.iter().find(|r| r.name == READER).unwrap();
        assert!(reader.grants.iter().all(|g| g.access == Access::Read));
    }

    #[test]
    fn policy_writers_get_the_admin_role_too() {
        let p = plan(&[id("east"), id("west")], &[id("west")]);
        assert_eq!(p.users[0].roles, ["strait-cluster-east"]);
        assert_eq!(
            p.users[1].roles,
            ["strait-cluster-west", "strait-policy-admin"]
        );
    }

    #[test]
    fn diffs_change_only_what_differs() {
        let a = Grant::prefix("/strait/v1/", Access::Read);
        let b = Grant::key("/strait/v1/clusters/east", Access::ReadWrite);
        let c = Grant::prefix("/strait/v1/old/", Access::ReadWrite);
        let (g, r) = diff_grants(&[a.clone(), b.clone()], &[a.clone(), b.clone()]);
        assert!(g.is_empty() && r.is_empty());
        let (g, r) = diff_grants(&[a.clone(), c.clone()], &[a.clone(), b.clone()]);
        assert_eq!(g, std::slice::from_ref(&b));
        assert_eq!(r, [c]);
        // A changed access is granted again (etcd replaces it), not revoked.
        let a_rw = Grant::prefix("/strait/v1/", Access::ReadWrite);
        let (g, r) = diff_grants(&[a_rw], &[a]);
        assert_eq!(g.len(), 1);
        assert!(r.is_empty());

        let (g, r) = diff_roles(
            &["strait-reader".into(), "ops".into()],
            &["strait-cluster-east".into()],
        );
        assert_eq!(g, ["strait-cluster-east"]);
        assert_eq!(r, ["strait-reader"]);
    }
}
