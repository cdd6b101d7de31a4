//! `meterd profiles`: the device profile library.

use super::*;

/// `meterd profiles [NAME]`
#[derive(Debug, Args)]
pub struct ProfilesCmd {
    /// Directory of site profiles in addition to the built-in ones.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Show this profile's register table.
    pub name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

impl ProfilesCmd {
    /// Lists or shows profiles.
    pub fn execute(self) -> Result<()> {
        let dir = self
            .dir
            .unwrap_or_else(|| Path::new(config::DEFAULT_PATH).with_file_name("profiles"));
        let lib =
            config::load_profiles(&dir).map_err(|i| config_failure(ConfigError::Invalid(i)))?;
        match self.name {
            None => {
                if self.json {
                    out(&json(
                        &lib.values()
                            .map(std::convert::AsRef::as_ref)
                            .collect::<Vec<_>>(),
                    )?);
                } else {
                    let mut rows: Vec<Vec<String>> = lib
                        .values()
                        .map(|p| {
                            vec![
                                p.name.clone(),
                                "modbus".into(),
                                p.registers.len().to_string(),
                                p.description.clone(),
                            ]
                        })
                        .collect();
                    rows.extend(dlt645_library()?.values().map(|p| {
                        vec![
                            p.name.clone(),
                            "dlt645".into(),
                            p.items.len().to_string(),
                            p.description.clone(),
                        ]
                    }));
                    out(&table(
                        &["profile", "protocol", "values", "description"],
                        &rows,
                    ));
                }
            }
            Some(n) if !lib.contains_key(&n) && dlt645_library()?.contains_key(&n) => {
                let lib = dlt645_library()?;
                let p = &lib[&n];
                out(&format!(
                    "{} (DL/T 645-2007): {}\nsource: {}\n",
                    p.name, p.description, p.source
                ));
                if let Some(c) = &p.commissioning {
                    out(&format!("commissioning: {c}\n"));
                }
                let rows: Vec<Vec<String>> = p
                    .items
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.to_string(),
                            i.quantity.to_string(),
                            i.di.to_string(),
                            format!("{:?}", i.format),
                            i.scale.to_string(),
                            i.unit.to_string(),
                        ]
                    })
                    .collect();
                out(&table(
                    &["item", "quantity", "di", "format", "scale", "unit"],
                    &rows,
                ));
            }
            Some(n) => {
                let p = lib
                    .get(&n)
                    .with_context(|| format!("no profile {n:?}; `meterd profiles` lists them"))?;
                if self.json {
                    out(&json(p.as_ref())?);
                } else {
                    out(&format!(
                        "{}: {}\nsource: {}\n",
                        p.name, p.description, p.source
                    ));
                    if let Some(c) = &p.commissioning {
                        out(&format!("commissioning: {c}\n"));
                    }
                    let rows: Vec<Vec<String>> = p
                        .registers
                        .iter()
                        .map(|r| {
                            vec![
                                r.name.to_string(),
                                r.quantity.to_string(),
                                r.function.to_string(),
                                format!("{:#06x}", r.address),
                                format!("{:?}", r.ty).to_lowercase(),
                                r.scale.to_string(),
                                r.unit.to_string(),
                            ]
                        })
                        .collect();
                    out(&table(
                        &[
                            "register", "quantity", "table", "address", "type", "scale", "unit",
                        ],
                        &rows,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The built-in DL/T 645 profiles.
fn dlt645_library() -> Result<BTreeMap<String, crate::dlt645::profile::Profile>> {
    crate::dlt645::profile::builtin()
        .map_err(|e| anyhow::anyhow!("built-in DL/T 645 profiles: {e:?}"))
}
