//! `deploylock windows`: the freeze windows of a namespace, kept here so the
//! CLI module only dispatches.

use kube::Client;
use kube::api::{Api, ListParams};

use super::FreezeWindow;

/// Arguments of `deploylock windows`.
#[derive(clap::Args, Debug)]
pub struct WindowsArgs {
    /// List the windows of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

/// The windows of `namespace` (or of all), ordered by their next start.
pub async fn list(
    client: &Client,
    namespace: &str,
    all_namespaces: bool,
) -> Result<Vec<FreezeWindow>, kube::Error> {
    let api: Api<FreezeWindow> = if all_namespaces {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), namespace)
    };
    let mut windows = api.list(&ListParams::default()).await?.items;
    // Open ones first, then by next start;
    // windows without one (not Ready, or over) last.
    windows.sort_by_key(|window| {
        let status = window.status.clone().unwrap_or_default();
        (
            status.open.is_none(),
            status.next_start.is_none(),
            status.next_start,
        )
    });
    Ok(windows)
}
