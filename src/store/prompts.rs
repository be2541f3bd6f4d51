//! Versioned system prompts: `prompts`: name ‖ 0 ‖ version (u32 BE) → [`PromptVersion`].
//! A new text is always a new version (1, 2, …); nothing is overwritten.

use super::{decode, encode, PromptVersion, Store, StoreError};

fn prompt_key(name: &str, version: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 5);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn prefix(name: &str) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key
}

impl Store {
    /// Stores `content` as the next version of prompt `name`; answers it.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn put_prompt(
        &self,
        name: &str,
        content: &str,
        created_at: i64,
    ) -> Result<PromptVersion, StoreError> {
        // Compare-and-swap on the next free number: two writers never take the same version.
        let p = loop {
            let last = match self
                .prompts
                .scan_prefix(prefix(name))
                .next_back()
                .transpose()?
            {
                Some((_, v)) => decode::<PromptVersion>("prompts", name, &v)?.version,
                None => 0,
            };
            let p = PromptVersion {
                name: name.to_owned(),
                version: last + 1,
                content: content.to_owned(),
                created_at,
            };
            let key = prompt_key(name, p.version);
            if self
                .prompts
                .compare_and_swap(key, None as Option<&[u8]>, Some(encode(&p)?))?
                .is_ok()
            {
                break p;
            }
        };
        self.flush().await?;
        Ok(p)
    }

    /// Every version of prompt `name`, oldest first.
    ///
    /// # Errors
    /// Storage failures or corrupt records.
    pub fn prompt_versions(&self, name: &str) -> Result<Vec<PromptVersion>, StoreError> {
        self.prompts
            .scan_prefix(prefix(name))
            .map(|kv| decode("prompts", name, &kv?.1))
            .collect()
    }

    /// One version of prompt `name`, or its newest with `None`.
    ///
    /// # Errors
    /// Storage failures or corrupt records.
    pub fn prompt(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<PromptVersion>, StoreError> {
        let raw = match version {
            Some(v) => self.prompts.get(prompt_key(name, v))?,
            None => self
                .prompts
                .scan_prefix(prefix(name))
                .next_back()
                .transpose()?
                .map(|(_, v)| v),
        };
        raw.map(|v| decode("prompts", name, &v)).transpose()
    }
}
