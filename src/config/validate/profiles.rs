//! `[profiles]`: the built-in library plus a site directory of profile files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::modbus::profile::{self, Profile};

use super::{Issue, RawProfiles, Validator};

impl Validator {
    pub(in crate::config) fn profiles(
        &mut self,
        cfg: &RawProfiles,
        base: &Path,
    ) -> BTreeMap<String, Arc<Profile>> {
        self.profiles_opt(cfg, base, cfg.dir.is_some())
    }

    pub(in crate::config) fn profiles_opt(
        &mut self,
        cfg: &RawProfiles,
        base: &Path,
        must_exist: bool,
    ) -> BTreeMap<String, Arc<Profile>> {
        let mut out: BTreeMap<String, Arc<Profile>> = BTreeMap::new();
        match profile::builtin() {
            Ok(lib) => out.extend(lib.into_iter().map(|(k, v)| (k, Arc::new(v)))),
            Err(errs) => {
                for (file, i) in errs {
                    self.issues.push(Issue {
                        file,
                        key: i.key,
                        message: i.message,
                    });
                }
            }
        }
        if !self.environment {
            return out;
        }
        let dir = base.join(cfg.dir.as_deref().unwrap_or(Path::new("profiles")));
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                if must_exist {
                    self.push(
                        "profiles.dir",
                        format!("cannot read directory {}: {e}", dir.display()),
                    );
                }
                return out;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for path in files {
            let file = path.display().to_string();
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| {
                    vec![profile::ProfileIssue {
                        key: String::new(),
                        message: format!("cannot read: {e}"),
                    }]
                })
                .and_then(|t| Profile::from_toml(&t));
            match parsed {
                Ok(p) => {
                    if out.contains_key(&p.name) {
                        self.issues.push(Issue {
                            file,
                            key: "profile.name".into(),
                            message: format!("{:?} is already defined (built-in or another file): give the site profile its own name", p.name),
                        });
                    } else {
                        out.insert(p.name.clone(), Arc::new(p));
                    }
                }
                Err(issues) => self.issues.extend(issues.into_iter().map(|i| Issue {
                    file: file.clone(),
                    key: i.key,
                    message: i.message,
                })),
            }
        }
        out
    }
}
