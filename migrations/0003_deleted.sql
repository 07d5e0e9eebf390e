-- When a job's object left the cluster. A job deleted before it finished
-- ends in phase 'Deleted'; one deleted after it finished keeps the phase it
-- ended in, and both get a 'Deleted' transition.
ALTER TABLE jobs ADD COLUMN deleted_at TIMESTAMPTZ;
