//! Reading every entry of a hash map (the connection tables): for `status`, the metrics and
//! legacy mode's garbage collection. In batches (`sys::hash_entries`), since the tables hold up
//! to 65,536 entries by default and aya reads them one or two system calls per entry (a scrape
//! of both full tables took about 60 ms of CPU that way); one by one on kernels without batches.
use std::{collections::HashSet, hash::Hash, os::fd::AsFd as _};

use anyhow::Result;
use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, Map, MapData},
};

use super::sys;

/// Every entry of the hash map `m`, each key once.
pub fn entries<K: Pod + Eq + Hash, V: Pod>(m: &Map) -> Result<Vec<(K, V)>> {
    // Checks the key and value sizes against the map's.
    let map = HashMap::<&MapData, K, V>::try_from(m)?;
    match sys::hash_entries(map.map().fd().as_fd())? {
        Some(all) => Ok(all),
        None => one_by_one(&map),
    }
}

/// One key after the other: a key deleted meanwhile makes the kernel start over from the first
/// bucket, so some come twice, and a table that keeps changing could be walked forever: at most
/// as many reads as the map has room for.
fn one_by_one<K: Pod + Eq + Hash, V: Pod>(map: &HashMap<&MapData, K, V>) -> Result<Vec<(K, V)>> {
    let max = map.map().info()?.max_entries() as usize;
    let mut seen = HashSet::new();
    Ok(map
        .iter()
        .take(max)
        .filter_map(|e| e.ok())
        .filter(|(k, _)| seen.insert(*k))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Value = [u64; 4];

    /// A kernel hash map holding `n` entries, as a `Map` the way readers open one.
    fn filled(n: u32) -> Map {
        let mut m = HashMap::<MapData, u32, Value>::create((2 * n).max(16), 0)
            .expect("creating a BPF hash map (needs root: CAP_BPF)");
        for i in 0..n {
            m.insert(i, [u64::from(i); 4], 0).unwrap();
        }
        let fd = m.map().fd().as_fd().try_clone_to_owned().unwrap();
        Map::from_map_data(MapData::from_fd(fd).unwrap()).unwrap()
    }

    fn sorted(mut v: Vec<(u32, Value)>) -> Vec<(u32, Value)> {
        v.sort_unstable_by_key(|(k, _)| *k);
        v
    }

    /// More entries than one batch holds: every entry once, with its value, in batches and one
    /// by one alike.
    #[test]
    fn every_entry_once_in_batches_and_one_by_one() {
        let n = 10_000;
        let map = filled(n);
        let want: Vec<(u32, Value)> = (0..n).map(|i| (i, [u64::from(i); 4])).collect();
        let hm = HashMap::<&MapData, u32, Value>::try_from(&map).unwrap();
        let batched = sys::hash_entries::<u32, Value>(hm.map().fd().as_fd())
            .unwrap()
            .expect("this kernel (5.6 or later) reads hash maps in batches");
        assert_eq!(sorted(batched), want);
        assert_eq!(sorted(entries::<u32, Value>(&map).unwrap()), want);
        assert_eq!(sorted(one_by_one(&hm).unwrap()), want);
    }

    #[test]
    fn an_empty_map_has_no_entries() {
        assert!(entries::<u32, Value>(&filled(0)).unwrap().is_empty());
    }

    #[test]
    fn a_key_of_the_wrong_size_is_refused() {
        assert!(entries::<u64, Value>(&filled(1)).is_err());
    }
}
