//! openraft's own storage conformance suite (`Suite::test_all`, ~35 cases including a
//! snapshot transfer between two stores) against the heed store, each case on a fresh
//! data directory.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use tessera_raft::store::log::LogStore;
use tessera_raft::store::stm::StateMachine;
use tessera_raft::store::{MAP_SIZE_BYTES_DEFAULT, Store, StoreOptions};
use tessera_raft::types::TypeConfig;

struct HeedBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for HeedBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions {
            map_size_bytes: MAP_SIZE_BYTES_DEFAULT >> 4,
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("raft"), options).expect("open a fresh store");
        Ok((dir, LogStore::new(store.clone()), StateMachine::new(store)))
    }
}

#[test]
fn heed_store_passes_openraft_storage_suite() {
    Suite::test_all(HeedBuilder).expect("storage suite");
}
