//! Responses of the OpenAI Responses API: each is a turn of a conversation, so a record keeps
//! only what the turn's messages do not (its id, the request's settings, which messages are its
//! input and which its output). Trees: `responses` (id → [`ResponseRecord`]) and
//! `responses_by_conversation` (conversation id ‖ response id → ()), so deleting a conversation
//! deletes its responses.

use serde::{Deserialize, Serialize};

use super::{decode, encode, Store, StoreError};
use crate::domain::{ResponseFormat, Tool, ToolChoice, Usage};
use crate::ids::{ConversationId, TenantId};

/// A stored response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseRecord {
    pub id: String,
    pub tenant: TenantId,
    pub conversation: ConversationId,
    /// The route asked for.
    pub model: String,
    pub created_at: i64,
    /// The seqs of the messages this response was given (first..=last).
    pub input_seqs: (u64, u64),
    /// The seq of its reply (`None` while running, or when it failed before a reply).
    pub reply_seq: Option<u64>,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<super::StoredError>,
    #[serde(default)]
    pub usage: Usage,
    /// The upstream model that wrote it.
    #[serde(default)]
    pub upstream_model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_response_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ResponseFormat>,
}

fn index_key(conv: &ConversationId, id: &str) -> Vec<u8> {
    let mut k = conv.as_bytes().to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

impl Store {
    /// Stores (or replaces) a response, durably.
    ///
    /// # Errors
    /// On a storage failure.
    pub async fn put_response(&self, rec: &ResponseRecord) -> Result<(), StoreError> {
        self.responses.insert(rec.id.as_bytes(), encode(rec)?)?;
        self.responses_by_conversation
            .insert(index_key(&rec.conversation, &rec.id), [])?;
        self.flush().await
    }

    /// The response `id` if it exists and belongs to `tenant` (another tenant's is absent).
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn response(
        &self,
        id: &str,
        tenant: &TenantId,
    ) -> Result<Option<ResponseRecord>, StoreError> {
        let Some(raw) = self.responses.get(id.as_bytes())? else {
            return Ok(None);
        };
        let rec: ResponseRecord = decode("responses", id, &raw)?;
        Ok((&rec.tenant == tenant).then_some(rec))
    }

    /// The conversation response `id` belongs to, whoever's it is (cluster mode routes a
    /// request to the node running it; that node checks the tenant).
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn response_conversation(&self, id: &str) -> Result<Option<ConversationId>, StoreError> {
        let Some(raw) = self.responses.get(id.as_bytes())? else {
            return Ok(None);
        };
        let rec: ResponseRecord = decode("responses", id, &raw)?;
        Ok(Some(rec.conversation))
    }

    /// Deletes a response record (its conversation's messages stay), durably.
    ///
    /// # Errors
    /// On a storage failure.
    pub async fn delete_response(&self, rec: &ResponseRecord) -> Result<(), StoreError> {
        self.responses.remove(rec.id.as_bytes())?;
        self.responses_by_conversation
            .remove(index_key(&rec.conversation, &rec.id))?;
        self.flush().await
    }

    /// Removes every response of a conversation (part of deleting it; the caller flushes).
    pub(super) fn remove_conversation_responses(
        &self,
        conv: &ConversationId,
    ) -> Result<(), StoreError> {
        let mut index = super::kv::Batch::default();
        let mut records = super::kv::Batch::default();
        for kv in self.responses_by_conversation.scan_prefix(conv.as_bytes()) {
            let (k, _) = kv?;
            records.remove(&k[ConversationId::LEN..]);
            index.remove(k);
        }
        self.responses.apply_batch(records)?;
        self.responses_by_conversation.apply_batch(index)?;
        Ok(())
    }
}
