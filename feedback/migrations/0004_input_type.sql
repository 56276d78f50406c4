-- Image models' inputs are kept as sent: the encoded image's bytes, with its media type here.
-- NULL is a .npy array (every input stored before images, and every tensor input).
ALTER TABLE predictions ADD COLUMN input_type text
    CHECK (input_type IS NULL OR input_type IN ('image/png', 'image/jpeg', 'image/webp'));
