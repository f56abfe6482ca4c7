//! Leading a PostgreSQL store: one coordinator at a time holds a lease in the
//! database (`shoal_leader`); the others stand by and take over when it lapses.
//! The database's clock decides, so the machines' clocks need not agree. Every
//! commit of the leader renews the lease in its own transaction and fails if
//! the lease was lost (fencing), and a renewer keeps it while nothing is
//! committed: a coordinator cut off from the database writes nothing after a
//! standby took over, and stops.

use std::time::Duration;

use crate::db::{PgConnection, Sql};
use crate::{Error, Result};

/// The database's clock, in milliseconds.
macro_rules! db_now {
    () => {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    };
}

/// Who leads, and for how long a renewal holds.
#[derive(Clone, Debug)]
pub struct Lease {
    /// This coordinator: unique per process.
    pub holder: String,
    pub length: Duration,
}

impl Lease {
    fn length_ms(&self) -> i64 {
        i64::try_from(self.length.as_millis()).unwrap_or(i64::MAX)
    }

    /// Takes the lead if nobody holds it (or it lapsed); else who holds it.
    pub fn try_take(&self, sql: &mut Sql) -> Result<std::result::Result<(), String>> {
        let taken = sql.first(
            concat!(
                "INSERT INTO shoal_leader (id, holder, until_ms) VALUES (1, ?1, ",
                db_now!(),
                " + ?2)
                 ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
                 WHERE shoal_leader.holder = excluded.holder OR shoal_leader.until_ms < ",
                db_now!(),
                " RETURNING holder"
            ),
            &[&self.holder, &self.length_ms()],
            |r| r.get::<String>(0),
        )?;
        if taken.is_some() {
            return Ok(Ok(()));
        }
        let holder = sql
            .first("SELECT holder FROM shoal_leader WHERE id = 1", &[], |r| {
                r.get::<String>(0)
            })?
            .unwrap_or_default();
        Ok(Err(holder))
    }

    /// Renews the lead, or fails if another coordinator took it (or it lapsed).
    pub fn renew(&self, sql: &mut Sql) -> Result<()> {
        let renewed = sql.execute(
            concat!(
                "UPDATE shoal_leader SET until_ms = ",
                db_now!(),
                " + ?2 WHERE id = 1 AND holder = ?1 AND until_ms >= ",
                db_now!()
            ),
            &[&self.holder, &self.length_ms()],
        )?;
        if renewed == 0 {
            return Err(Error::FailedPrecondition(format!(
                "coordinator {} no longer leads this database (its lease of {} s lapsed, or a standby took over)",
                self.holder,
                self.length.as_secs()
            )));
        }
        Ok(())
    }
}

impl Lease {
    /// Fails unless this coordinator leads now: a check that takes no lock,
    /// for writers beside the store (tracking) that must not wait on its commits.
    pub fn holds(&self, sql: &mut Sql) -> Result<()> {
        let held = sql.first(
            concat!(
                "SELECT holder FROM shoal_leader WHERE id = 1 AND holder = ?1 AND until_ms >= ",
                db_now!()
            ),
            &[&self.holder],
            |r| r.get::<String>(0),
        )?;
        if held.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "coordinator {} no longer leads this database",
                self.holder
            )));
        }
        Ok(())
    }
}

/// Waits until this coordinator leads the database at `url`; `standing_by`
/// hears who leads meanwhile (once per holder).
pub fn wait_for_lead(url: &str, lease: &Lease, mut standing_by: impl FnMut(&str)) -> Result<()> {
    // The schema first (the lease lives in it): migrated by whoever comes first.
    drop(crate::store::SqlStore::connect_postgres(url)?);
    let mut conn = PgConnection::connect(url)?;
    let mut told = String::new();
    loop {
        match conn.transaction(|sql| lease.try_take(sql))? {
            Ok(()) => return Ok(()),
            Err(holder) => {
                if holder != told {
                    standing_by(&holder);
                    told = holder;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Renews the lead every third of its length, on a connection of its own,
/// until it fails: then `lost` is called (the coordinator stops).
pub fn keep_lead(
    url: &str,
    lease: Lease,
    lost: impl FnOnce(String) + Send + 'static,
) -> Result<()> {
    let mut conn = PgConnection::connect(url)?;
    std::thread::Builder::new()
        .name("shoal-leader".into())
        .spawn(move || {
            loop {
                std::thread::sleep(lease.length / 3);
                if let Err(e) = conn.transaction(|sql| lease.renew(sql)) {
                    lost(e.to_string());
                    return;
                }
            }
        })
        .map_err(|e| Error::Internal(format!("leader lease thread: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_coordinator_leads_until_its_lease_lapses() {
        let url = crate::db::test_postgres();
        drop(crate::store::SqlStore::connect_postgres(&url).expect("store"));
        let mut conn = PgConnection::connect(&url).expect("connect");
        let lease = |holder: &str| Lease {
            holder: holder.into(),
            length: Duration::from_millis(400),
        };
        let (a, b) = (lease("a"), lease("b"));
        assert_eq!(conn.transaction(|sql| a.try_take(sql)).expect("a"), Ok(()));
        assert_eq!(
            conn.transaction(|sql| b.try_take(sql)).expect("b"),
            Err("a".to_string())
        );
        conn.transaction(|sql| a.renew(sql)).expect("a renews");
        conn.transaction(|sql| a.holds(sql)).expect("a holds");
        assert!(conn.transaction(|sql| b.holds(sql)).is_err());
        std::thread::sleep(Duration::from_millis(600));
        assert!(conn.transaction(|sql| a.holds(sql)).is_err(), "lapsed");
        assert_eq!(conn.transaction(|sql| b.try_take(sql)).expect("b"), Ok(()));
        let lost = conn.transaction(|sql| a.renew(sql)).expect_err("b leads");
        assert!(lost.to_string().contains("no longer leads"), "{lost}");
    }
}
