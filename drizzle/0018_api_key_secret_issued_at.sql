ALTER TABLE "api_keys" ADD COLUMN "secret_issued_at" timestamp (3) with time zone;--> statement-breakpoint
ALTER TABLE "api_keys" ADD COLUMN "previous_secret_issued_at" timestamp (3) with time zone;