-- Federated rounds also record the privacy spent after the round and how
-- long the round took.
ALTER TABLE rounds ADD COLUMN epsilon DOUBLE PRECISION;
ALTER TABLE rounds ADD COLUMN seconds DOUBLE PRECISION;
