//! Ending an owner that abandons its locks without dying: a gateway session that ends holding
//! locks (its connection closed or reset, its idle timeout, the server stopping).

use super::{LockTable, OwnerRef};
use crate::error::Result;

impl LockTable {
    /// As [`release_all`](LockTable::release_all), but each lock released is marked
    /// `OWNER_DIED` for its next holder, as when a dead process is reaped: the owner gave up its
    /// locks without unlocking them, so what they protect may be half written. Returns how many
    /// were released.
    pub(crate) fn abandon_all(&self, me: OwnerRef, shards: impl Iterator<Item = u32>) -> Result<usize> {
        self.release_owner(me.latch_id(), me.idx, shards, true)
    }
}
