-- What each workload may do on its own, with no delegation from a person: a JSON array of scope
-- objects, like ceiling. Workloads registered before it existed get none.
ALTER TABLE workloads ADD COLUMN autonomous TEXT NOT NULL DEFAULT '[]';
