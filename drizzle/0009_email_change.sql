ALTER TABLE "email_tokens" ADD COLUMN "new_email" text;--> statement-breakpoint
ALTER TABLE "email_tokens" ADD COLUMN "requested_by" text;